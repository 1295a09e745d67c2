//! A real local Kubernetes control plane for tests and demos: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake
//! kubelets) and the External Secrets Operator controller, all as child
//! processes on free 127.0.0.1 ports.
//!
//! Binaries come from `testenv/build.sh` (`make testenv`), which writes their
//! paths to `target/testenv.env`. Certificates are generated here with rcgen.
//!
//! No orphans: every component runs in the process group of a small watchdog
//! shell whose stdin is a pipe from this process. When this process ends for
//! any reason (normal exit, panic, SIGKILL) the pipe closes, the watchdog wakes
//! up and kills the whole group.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Paths written by `testenv/build.sh`.
pub struct Binaries {
    pub kube_bin: PathBuf,
    pub eso: PathBuf,
    pub eso_crds: PathBuf,
    pub kwok_stages: PathBuf,
    pub moto_server: PathBuf,
    pub all: HashMap<String, String>,
}

impl Binaries {
    pub fn load(repo: &Path) -> Result<Self> {
        let envfile = repo.join("target/testenv.env");
        let text = fs::read_to_string(&envfile).with_context(|| {
            format!(
                "{} is missing: the test environment is not built. Run `make testenv` \
                 (builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok \
                 and ESO from the Go module proxy; about 30 min cold, seconds when cached).",
                envfile.display()
            )
        })?;
        let all: HashMap<String, String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| -> Result<PathBuf> {
            let p = PathBuf::from(all.get(k).with_context(|| {
                format!("{k} missing in {}: run `make testenv`", envfile.display())
            })?);
            if !p.exists() {
                bail!(
                    "{} (from {k}) does not exist: run `make testenv`",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Self {
            kube_bin: get("REKEY_KUBE_BIN")?,
            eso: get("REKEY_ESO_BIN")?,
            eso_crds: get("REKEY_ESO_CRDS")?,
            kwok_stages: get("REKEY_KWOK_STAGES")?,
            moto_server: get("REKEY_MOTO_SERVER")?,
            all,
        })
    }

    pub fn kubectl(&self) -> PathBuf {
        self.kube_bin.join("kubectl")
    }
}

/// What to start beside the API server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of fake kwok Nodes.
    pub nodes: usize,
    /// Start the External Secrets Operator controller (and apply its CRDs).
    pub eso: bool,
    /// Extra environment for the ESO process.
    pub eso_env: Vec<(String, String)>,
    /// Start moto (AWS Secrets Manager emulator); ESO's AWS provider is
    /// pointed at it with AWS_SECRETSMANAGER_ENDPOINT.
    pub moto: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 2,
            eso: true,
            eso_env: vec![],
            moto: true,
        }
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_url: String,
    /// moto's URL, when started.
    pub moto_url: Option<String>,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub bins: Binaries,
    pub ports: HashMap<&'static str, u16>,
    watchdog: Option<(Child, ChildStdin)>,
    children: Vec<(String, Child)>,
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pki {
    ca_pem: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    sa_key: String,
    sa_pub: String,
}

fn make_pki() -> Result<Pki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rekey-testenv-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut sp = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    sp.subject_alt_names
        .push(SanType::IpAddress("10.96.0.1".parse()?));
    sp.distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving = sp.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut ap = CertificateParams::new(Vec::<String>::new())?;
    ap.distinguished_name
        .push(DnType::CommonName, "rekey-testenv-admin");
    ap.distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    ap.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin = ap.signed_by(&admin_key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        serving_cert: serving.pem(),
        serving_key: serving_key.serialize_pem(),
        admin_cert: admin.pem(),
        admin_key: admin_key.serialize_pem(),
        sa_pub: sa_key.public_key_pem(),
        sa_key: sa_key.serialize_pem(),
    })
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub fn kubeconfig_yaml(server: &str, ca: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: rekey-testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: rekey-testenv\n  context: {{cluster: rekey-testenv, user: admin, namespace: default}}\ncurrent-context: rekey-testenv\n",
        b64(ca),
        b64(cert),
        b64(key)
    )
}

impl Cluster {
    /// Starts the whole environment in `dir` (created if needed) and waits
    /// until every component is ready.
    pub fn start(dir: &Path, opts: &Options) -> Result<Cluster> {
        let started = Instant::now();
        let bins = Binaries::load(&repo_root())?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let pki_dir = dir.join("pki");
        fs::create_dir_all(&pki_dir)?;
        let pki = make_pki()?;
        for (name, content) in [
            ("ca.crt", &pki.ca_pem),
            ("apiserver.crt", &pki.serving_cert),
            ("apiserver.key", &pki.serving_key),
            ("admin.crt", &pki.admin_cert),
            ("admin.key", &pki.admin_key),
            ("sa.key", &pki.sa_key),
            ("sa.pub", &pki.sa_pub),
        ] {
            fs::write(pki_dir.join(name), content)?;
        }

        let mut ports = HashMap::new();
        for name in [
            "etcd",
            "etcd-peer",
            "apiserver",
            "kcm",
            "scheduler",
            "kwok",
            "eso-metrics",
            "eso-webhook",
            "moto",
        ] {
            ports.insert(name, free_port());
        }
        let api_url = format!("https://127.0.0.1:{}", ports["apiserver"]);
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(&api_url, &pki.ca_pem, &pki.admin_cert, &pki.admin_key),
        )?;

        let mut cluster = Cluster {
            dir: dir.clone(),
            kubeconfig: kubeconfig.clone(),
            api_url: api_url.clone(),
            moto_url: None,
            ca_pem: pki.ca_pem.clone(),
            admin_cert_pem: pki.admin_cert.clone(),
            admin_key_pem: pki.admin_key.clone(),
            bins,
            ports: ports.clone(),
            watchdog: None,
            children: vec![],
        };
        cluster.start_watchdog()?;

        // etcd
        let etcd_url = format!("http://127.0.0.1:{}", ports["etcd"]);
        let peer_url = format!("http://127.0.0.1:{}", ports["etcd-peer"]);
        cluster.spawn(
            "etcd",
            &cluster.bins.kube_bin.join("etcd"),
            &[
                "--name=rekey0".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=rekey0={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--auto-compaction-retention=1".into(),
                "--log-level=warn".into(),
            ],
            &[],
        )?;
        cluster.wait_http(
            "etcd",
            &format!("{etcd_url}/health"),
            Duration::from_secs(60),
        )?;

        let p = |n: &str| pki_dir.join(n).display().to_string();
        cluster.spawn(
            "kube-apiserver",
            &cluster.bins.kube_bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--etcd-prefix=/registry".into(),
                format!("--secure-port={}", ports["apiserver"]),
                "--bind-address=127.0.0.1".into(),
                // Only in-cluster clients would dial it; none run here. A
                // loopback address is refused for the kubernetes Endpoints.
                "--advertise-address=192.0.2.1".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--allow-privileged=true".into(),
                "--max-requests-inflight=0".into(),
                "--max-mutating-requests-inflight=0".into(),
                "--enable-priority-and-fairness=false".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        cluster.wait_apiserver(Duration::from_secs(120))?;

        let kc = kubeconfig.display().to_string();
        cluster.spawn(
            "kube-controller-manager",
            &cluster.bins.kube_bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports["kcm"]),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--service-account-private-key-file={}", p("sa.key")),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--controllers=*,-nodeipam,-cloud-node-lifecycle".into(),
                "--kube-api-qps=500".into(),
                "--kube-api-burst=1000".into(),
                "--concurrent-deployment-syncs=10".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        cluster.spawn(
            "kube-scheduler",
            &cluster.bins.kube_bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports["scheduler"]),
                "--leader-elect=false".into(),
                "--kube-api-qps=500".into(),
                "--kube-api-burst=1000".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        cluster.spawn(
            "kwok",
            &cluster.bins.kube_bin.join("kwok"),
            &[
                format!("--kubeconfig={kc}"),
                format!("--config={}", cluster.bins.kwok_stages.display()),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--manage-nodes-with-label-selector=".into(),
                "--manage-single-node=".into(),
                "--cidr=10.0.0.0/16".into(),
                "--node-ip=10.0.0.1".into(),
                "--node-lease-duration-seconds=40".into(),
                format!("--server-address=127.0.0.1:{}", ports["kwok"]),
            ],
            &[],
        )?;
        cluster.wait_https_insecure(
            "kube-controller-manager",
            ports["kcm"],
            Duration::from_secs(60),
        )?;
        cluster.wait_https_insecure(
            "kube-scheduler",
            ports["scheduler"],
            Duration::from_secs(60),
        )?;
        cluster.create_nodes(opts.nodes)?;

        if opts.moto {
            let url = format!("http://127.0.0.1:{}", ports["moto"]);
            cluster.spawn(
                "moto",
                &cluster.bins.moto_server.clone(),
                &[
                    "-H".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    ports["moto"].to_string(),
                ],
                &[],
            )?;
            cluster.wait_http("moto", &format!("{url}/moto-api/"), Duration::from_secs(60))?;
            cluster.moto_url = Some(url);
        }
        if opts.eso {
            cluster.kubectl(&[
                "apply",
                "--server-side",
                "-f",
                &cluster.bins.eso_crds.display().to_string(),
            ])?;
            cluster.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/externalsecrets.external-secrets.io",
                "crd/secretstores.external-secrets.io",
                "crd/clustersecretstores.external-secrets.io",
            ])?;
            let mut env: Vec<(String, String)> = vec![("KUBECONFIG".into(), kc.clone())];
            if let Some(moto) = &cluster.moto_url {
                env.push(("AWS_SECRETSMANAGER_ENDPOINT".into(), moto.clone()));
            }
            env.extend(opts.eso_env.iter().cloned());
            cluster.spawn(
                "external-secrets",
                &cluster.bins.eso.clone(),
                &[
                    format!("--metrics-addr=127.0.0.1:{}", ports["eso-metrics"]),
                    "--enable-leader-election=false".into(),
                    "--concurrent=4".into(),
                    "--loglevel=info".into(),
                    "--zap-time-encoding=iso8601".into(),
                    "--enable-push-secret-reconciler=false".into(),
                    "--enable-cluster-push-secret-reconciler=false".into(),
                    "--enable-cluster-external-secret-reconciler=false".into(),
                ],
                &env,
            )?;
            cluster.wait_http(
                "external-secrets",
                &format!("http://127.0.0.1:{}/metrics", ports["eso-metrics"]),
                Duration::from_secs(60),
            )?;
        }
        eprintln!(
            "[testenv] cluster ready at {api_url} in {:.1}s (dir {})",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(cluster)
    }

    /// The watchdog: a shell in its own process group, reading its stdin (a
    /// pipe from this process). EOF means this process is gone: it then kills
    /// the group, which holds every component.
    fn start_watchdog(&mut self) -> Result<()> {
        // `kill 0` signals the caller's own process group (portable to dash,
        // whose kill has no `--`).
        let script = r#"trap '' INT TERM HUP
read -r _
kill -TERM 0
for _ in 1 2 3 4 5 6 7 8 9 10; do
  sleep 0.5
  [ "$(pgrep -g $$ | wc -l)" -le 2 ] && break
done
kill -KILL 0"#;
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start watchdog")?;
        let stdin = child.stdin.take().unwrap();
        fs::write(self.dir.join("watchdog.pid"), child.id().to_string())?;
        self.watchdog = Some((child, stdin));
        Ok(())
    }

    pub fn process_group(&self) -> i32 {
        self.watchdog
            .as_ref()
            .map(|(c, _)| c.id() as i32)
            .unwrap_or(0)
    }

    fn spawn(
        &mut self,
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir(&self.dir)
            .process_group(self.process_group());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} ({})", bin.display()))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails early with the component's log tail if it exited.
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log =
                    fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{name} exited with {status}:\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }

    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if ok(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready after {timeout:?} (logs in {})",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_http(&mut self, what: &str, url: &str, timeout: Duration) -> Result<()> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        self.wait_until(what, timeout, |_| {
            client
                .get(url)
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
    }

    fn wait_https_insecure(&mut self, what: &str, port: u16, timeout: Duration) -> Result<()> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .danger_accept_invalid_certs(true)
            .build()?;
        let url = format!("https://127.0.0.1:{port}/healthz");
        self.wait_until(what, timeout, |_| {
            client
                .get(&url)
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
    }

    fn admin_http(&self) -> Result<reqwest::blocking::Client> {
        let identity = reqwest::Identity::from_pem(
            format!("{}{}", self.admin_cert_pem, self.admin_key_pem).as_bytes(),
        )?;
        Ok(reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .identity(identity)
            .build()?)
    }

    fn wait_apiserver(&mut self, timeout: Duration) -> Result<()> {
        let client = self.admin_http()?;
        let url = format!("{}/readyz", self.api_url);
        self.wait_until("kube-apiserver", timeout, |_| {
            client
                .get(&url)
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
    }

    /// Runs the built kubectl against this cluster; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bins.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .context("run kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let mut child = Command::new(self.bins.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn create_nodes(&mut self, n: usize) -> Result<()> {
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: kwok-node-{i}\n  annotations: {{node.alpha.kubernetes.io/ttl: \"0\", kwok.x-k8s.io/node: fake}}\n  labels: {{kubernetes.io/hostname: kwok-node-{i}, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}}\nspec:\n  taints: []\nstatus:\n  allocatable: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}\n  capacity: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}\n"
            ));
        }
        self.kubectl_stdin(&["apply", "-f", "-"], &yaml)?;
        let kubectl = self.bins.kubectl();
        let kc = self.kubeconfig.clone();
        self.wait_until("kwok nodes Ready", Duration::from_secs(60), |_| {
            Command::new(&kubectl)
                .arg(format!("--kubeconfig={}", kc.display()))
                .args([
                    "wait",
                    "--for=condition=Ready",
                    "node",
                    "--all",
                    "--timeout=1s",
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    }

    /// Pids of every process the environment started and still running.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Stops every component (also done by the watchdog when this process ends).
    pub fn stop(&mut self) {
        // Closing the pipe wakes the watchdog, which kills the group.
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
