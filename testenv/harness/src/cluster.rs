//! A real local Kubernetes control plane for tests and demos: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake
//! kubelets) and the External Secrets Operator controller, all as child
//! processes on free 127.0.0.1 ports.
//!
//! Binaries come from `testenv/build.sh` (`make testenv`), which writes their
//! paths to `target/testenv.env`. Certificates are generated here with rcgen.
//!
//! Ports: see `reserve_port`. Startup never hangs: every wait has a deadline
//! and a failure names the component with the tail of its log (`diagnose`).
//!
//! No orphans: every component runs in the process group of a small watchdog
//! shell whose stdin is a pipe from this process. When this process ends for
//! any reason (normal exit, panic, SIGKILL) the pipe closes, the watchdog wakes
//! up and kills the whole group.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::ops::Range;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once};
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
    /// Pods each kwok Node takes (a real Node's default: 110).
    pub pods_per_node: usize,
    /// Start the External Secrets Operator controller (and apply its CRDs).
    pub eso: bool,
    /// Extra environment for the ESO process.
    pub eso_env: Vec<(String, String)>,
    /// Start moto (AWS Secrets Manager emulator); ESO's AWS provider is
    /// pointed at it with AWS_SECRETSMANAGER_ENDPOINT.
    pub moto: bool,
    /// Write the API server's audit log (Metadata level, JSON lines) to
    /// `audit.log` in the cluster's directory: who asked for what, when.
    pub audit: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 110,
            eso: true,
            eso_env: vec![],
            moto: true,
            audit: false,
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
    /// The reservations behind `ports`, held for the life of the Cluster.
    leases: HashMap<&'static str, PortLease>,
    watchdog: Option<(Child, ChildStdin)>,
    /// Behind a Mutex so `diagnose` can poll them through a shared reference.
    children: Mutex<Vec<(String, Child)>>,
    /// rekey's CRD applied (see `fixtures::install_crd`), once per cluster.
    pub(crate) crd: Once,
    /// How each component was started, to start it again (`restart`).
    specs: Vec<Spec>,
}

/// The rekey repository: the directory above this crate holding
/// `testenv/versions.env`.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("testenv/versions.env").is_file())
        .unwrap_or_else(|| panic!("no testenv/versions.env above {}", here.display()))
        .to_path_buf()
}

// Port choice. Binding port 0 and releasing it is racy: the kernel hands out
// the same ephemeral ports to every process (and to outgoing connections), so
// another harness, or any client, can take the port before our component binds
// it. Instead a port is drawn at random from PORT_RANGE, below Linux's
// ephemeral range (32768-60999) so no outgoing connection gets it, and is
// reserved by an exclusive flock(2) on `<tmp>/rekey-testenv-ports/<port>.lock`
// for as long as the harness uses it: harnesses in parallel processes (and
// parallel threads: flock locks are per open file) skip locked ports. The
// kernel drops the lock when its holder dies, so a crash leaks nothing; the
// lock files are never deleted (deleting a lock file races with its next
// user). A port some unrelated process listens on is skipped by a test bind.
// Should an unrelated process still take a port first, the component's start
// fails with "address already in use" and `Cluster::bring_up` starts it again
// on fresh ports.
const PORT_RANGE: Range<u16> = 20000..32768;
/// Lines of a component's log quoted in an error.
const LOG_TAIL_LINES: usize = 40;
/// Starts of one component when its port is taken under it.
const START_ATTEMPTS: usize = 3;

/// A port reserved by this process until the lease is dropped.
pub struct PortLease {
    pub port: u16,
    _lock: File,
}

pub fn reserve_port() -> Result<PortLease> {
    let dir = std::env::temp_dir().join("rekey-testenv-ports");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for _ in 0..1000 {
        let port: u16 = rand::random_range(PORT_RANGE);
        let path = dir.join(format!("{port}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => continue,
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("lock {}", path.display()));
            }
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(PortLease { port, _lock: lock });
        }
    }
    bail!("no free port in {PORT_RANGE:?} after 1000 tries")
}

/// A reserved free port, held until this process exits.
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<PortLease>> = Mutex::new(Vec::new());
    let lease = reserve_port().expect("reserve a free port");
    let port = lease.port;
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lease);
    port
}

/// How to tell that a component is up.
enum Probe {
    /// `GET http://127.0.0.1:<port of key><path>` answers 2xx.
    Http(&'static str, &'static str),
    /// `GET https://127.0.0.1:<port of key>/healthz` answers 2xx (any certificate).
    Healthz(&'static str),
    /// kube-apiserver's /readyz, with the admin identity.
    ApiServer,
}

type Ports = HashMap<&'static str, u16>;
/// Builds a component's arguments from the current ports.
type ArgsFn = Box<dyn Fn(&Ports) -> Vec<String> + Send + Sync>;

/// One component: its command line is built from the current ports, so it
/// can be started again on fresh ones.
struct Spec {
    name: &'static str,
    bin: PathBuf,
    /// The ports it listens on (keys of `Cluster::ports`).
    ports: &'static [&'static str],
    args: ArgsFn,
    env: Vec<(String, String)>,
    probe: Probe,
    timeout: Duration,
}

/// How a component's own process is doing.
enum State {
    Running,
    Exited(ExitStatus),
    /// It logged that its port was taken (whether it exited yet or not).
    PortTaken,
}

fn port_taken(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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
    /// until every component is ready. Every step has a deadline; an error
    /// names the component and quotes the tail of its log.
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

        let mut cluster = Cluster {
            dir: dir.clone(),
            kubeconfig: dir.join("kubeconfig"),
            api_url: String::new(),
            moto_url: None,
            ca_pem: pki.ca_pem.clone(),
            admin_cert_pem: pki.admin_cert.clone(),
            admin_key_pem: pki.admin_key.clone(),
            bins,
            ports: HashMap::new(),
            leases: HashMap::new(),
            watchdog: None,
            children: Mutex::new(vec![]),
            crd: Once::new(),
            specs: vec![],
        };
        cluster.lease_ports(&[
            "etcd",
            "etcd-peer",
            "apiserver",
            "kcm",
            "scheduler",
            "kwok",
            "eso-metrics",
            "moto",
        ])?;
        cluster.start_watchdog()?;
        let kube_bin = cluster.bins.kube_bin.clone();

        cluster.bring_up(vec![Spec {
            name: "etcd",
            bin: kube_bin.join("etcd"),
            ports: &["etcd", "etcd-peer"],
            args: Box::new({
                let data_dir = dir.join("etcd");
                move |ports| {
                    let client = format!("http://127.0.0.1:{}", ports["etcd"]);
                    let peer = format!("http://127.0.0.1:{}", ports["etcd-peer"]);
                    vec![
                        "--name=rekey0".into(),
                        format!("--data-dir={}", data_dir.display()),
                        format!("--listen-client-urls={client}"),
                        format!("--advertise-client-urls={client}"),
                        format!("--listen-peer-urls={peer}"),
                        format!("--initial-advertise-peer-urls={peer}"),
                        format!("--initial-cluster=rekey0={peer}"),
                        "--unsafe-no-fsync=true".into(),
                        "--auto-compaction-retention=1".into(),
                        // 8 GiB instead of 2: the benchmark stores 1 GB of
                        // unrelated Secrets.
                        "--quota-backend-bytes=8589934592".into(),
                        "--log-level=warn".into(),
                    ]
                }
            }),
            env: vec![],
            probe: Probe::Http("etcd", "/health"),
            timeout: Duration::from_secs(60),
        }])?;

        let p = |n: &str| pki_dir.join(n).display().to_string();
        let audit_flags = if opts.audit {
            let policy = cluster.dir.join("audit-policy.yaml");
            fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
            )?;
            vec![
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", cluster.audit_log().display()),
                "--audit-log-format=json".to_string(),
                "--audit-log-mode=blocking".to_string(),
                // No rotation (its default is 100 MB): the benchmark reads
                // the whole log of a 1,000-rotation run.
                "--audit-log-maxsize=100000".to_string(),
            ]
        } else {
            vec![]
        };
        cluster.bring_up(vec![Spec {
            name: "kube-apiserver",
            bin: kube_bin.join("kube-apiserver"),
            ports: &["apiserver"],
            args: Box::new({
                let (cert, key, ca) = (p("apiserver.crt"), p("apiserver.key"), p("ca.crt"));
                let (sa_pub, sa_key) = (p("sa.pub"), p("sa.key"));
                move |ports| {
                    vec![
                        format!("--etcd-servers=http://127.0.0.1:{}", ports["etcd"]),
                        "--etcd-prefix=/registry".into(),
                        format!("--secure-port={}", ports["apiserver"]),
                        "--bind-address=127.0.0.1".into(),
                        // Only in-cluster clients would dial it; none run here. A
                        // loopback address is refused for the kubernetes Endpoints.
                        "--advertise-address=192.0.2.1".into(),
                        format!("--tls-cert-file={cert}"),
                        format!("--tls-private-key-file={key}"),
                        format!("--client-ca-file={ca}"),
                        format!("--service-account-key-file={sa_pub}"),
                        format!("--service-account-signing-key-file={sa_key}"),
                        "--service-account-issuer=https://kubernetes.default.svc.cluster.local"
                            .into(),
                        "--service-cluster-ip-range=10.96.0.0/16".into(),
                        "--authorization-mode=Node,RBAC".into(),
                        "--allow-privileged=true".into(),
                        "--max-requests-inflight=0".into(),
                        "--max-mutating-requests-inflight=0".into(),
                        "--enable-priority-and-fairness=false".into(),
                        "--v=1".into(),
                    ]
                    .into_iter()
                    .chain(audit_flags.clone())
                    .collect()
                }
            }),
            env: vec![],
            probe: Probe::ApiServer,
            timeout: Duration::from_secs(120),
        }])?;

        let kc = cluster.kubeconfig.display().to_string();
        let client_flags = {
            let kc = kc.clone();
            move || -> Vec<String> {
                vec![
                    format!("--kubeconfig={kc}"),
                    format!("--authentication-kubeconfig={kc}"),
                    format!("--authorization-kubeconfig={kc}"),
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
                    "--bind-address=127.0.0.1".into(),
                    "--leader-elect=false".into(),
                    "--kube-api-qps=500".into(),
                    "--kube-api-burst=1000".into(),
                    "--v=1".into(),
                ]
            }
        };
        cluster.bring_up(vec![
            Spec {
                name: "kube-controller-manager",
                bin: kube_bin.join("kube-controller-manager"),
                ports: &["kcm"],
                args: Box::new({
                    let (flags, ca, sa_key) = (client_flags.clone(), p("ca.crt"), p("sa.key"));
                    move |ports| {
                        let mut args = flags();
                        args.extend([
                            format!("--secure-port={}", ports["kcm"]),
                            format!("--root-ca-file={ca}"),
                            format!("--service-account-private-key-file={sa_key}"),
                            "--use-service-account-credentials=false".into(),
                            "--controllers=*,-nodeipam,-cloud-node-lifecycle".into(),
                            "--concurrent-deployment-syncs=10".into(),
                        ]);
                        args
                    }
                }),
                env: vec![],
                probe: Probe::Healthz("kcm"),
                timeout: Duration::from_secs(60),
            },
            Spec {
                name: "kube-scheduler",
                bin: kube_bin.join("kube-scheduler"),
                ports: &["scheduler"],
                args: Box::new({
                    let flags = client_flags.clone();
                    move |ports| {
                        let mut args = flags();
                        args.push(format!("--secure-port={}", ports["scheduler"]));
                        args
                    }
                }),
                env: vec![],
                probe: Probe::Healthz("scheduler"),
                timeout: Duration::from_secs(60),
            },
            Spec {
                name: "kwok",
                bin: kube_bin.join("kwok"),
                ports: &["kwok"],
                args: Box::new({
                    let (kc, stages) = (kc.clone(), cluster.bins.kwok_stages.clone());
                    move |ports| {
                        vec![
                            format!("--kubeconfig={kc}"),
                            format!("--config={}", stages.display()),
                            "--manage-all-nodes=false".into(),
                            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake"
                                .into(),
                            "--manage-nodes-with-label-selector=".into(),
                            "--manage-single-node=".into(),
                            "--cidr=10.0.0.0/16".into(),
                            "--node-ip=10.0.0.1".into(),
                            "--node-lease-duration-seconds=40".into(),
                            format!("--server-address=127.0.0.1:{}", ports["kwok"]),
                        ]
                    }
                }),
                env: vec![],
                probe: Probe::Http("kwok", "/healthz"),
                timeout: Duration::from_secs(60),
            },
        ])?;
        cluster.create_nodes(opts.nodes, opts.pods_per_node)?;
        // Pods are refused in a namespace until the ServiceAccount controller
        // made its `default` ServiceAccount: a working kcm does it in seconds.
        let client = cluster.admin_http()?;
        let sa_url = format!(
            "{}/api/v1/namespaces/default/serviceaccounts/default",
            cluster.api_url
        );
        cluster.wait_until(
            "kube-controller-manager",
            "the default ServiceAccount",
            Duration::from_secs(60),
            |_| {
                client
                    .get(&sa_url)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
            },
        )?;

        if opts.moto {
            cluster.bring_up(vec![Spec {
                name: "moto",
                bin: cluster.bins.moto_server.clone(),
                ports: &["moto"],
                args: Box::new(|ports| {
                    vec![
                        "-H".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        ports["moto"].to_string(),
                    ]
                }),
                env: vec![],
                probe: Probe::Http("moto", "/moto-api/"),
                timeout: Duration::from_secs(60),
            }])?;
            cluster.moto_url = Some(format!("http://127.0.0.1:{}", cluster.ports["moto"]));
        }
        if opts.eso {
            let crds = cluster.bins.eso_crds.display().to_string();
            cluster.kubectl_within(
                &["apply", "--server-side", "-f", &crds],
                None,
                Duration::from_secs(60),
            )?;
            cluster.kubectl_within(
                &[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    "crd/externalsecrets.external-secrets.io",
                    "crd/secretstores.external-secrets.io",
                    "crd/clustersecretstores.external-secrets.io",
                ],
                None,
                Duration::from_secs(70),
            )?;
            let mut env: Vec<(String, String)> = vec![("KUBECONFIG".into(), kc.clone())];
            if let Some(moto) = &cluster.moto_url {
                env.push(("AWS_SECRETSMANAGER_ENDPOINT".into(), moto.clone()));
            }
            env.extend(opts.eso_env.iter().cloned());
            cluster.bring_up(vec![Spec {
                name: "external-secrets",
                bin: cluster.bins.eso.clone(),
                ports: &["eso-metrics"],
                args: Box::new(|ports| {
                    vec![
                        format!("--metrics-addr=127.0.0.1:{}", ports["eso-metrics"]),
                        "--enable-leader-election=false".into(),
                        "--concurrent=4".into(),
                        "--loglevel=info".into(),
                        "--zap-time-encoding=iso8601".into(),
                        "--enable-push-secret-reconciler=false".into(),
                        "--enable-cluster-push-secret-reconciler=false".into(),
                        "--enable-cluster-external-secret-reconciler=false".into(),
                    ]
                }),
                env,
                probe: Probe::Http("eso-metrics", "/metrics"),
                timeout: Duration::from_secs(60),
            }])?;
        }
        eprintln!(
            "[testenv] cluster ready at {} in {:.1}s (dir {})",
            cluster.api_url,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(cluster)
    }

    /// Reserves fresh ports for `keys` (releasing any held before), and
    /// rewrites the kubeconfig when the API server's port changed.
    fn lease_ports(&mut self, keys: &[&'static str]) -> Result<()> {
        for &key in keys {
            let lease = reserve_port()?;
            self.ports.insert(key, lease.port);
            self.leases.insert(key, lease);
        }
        if keys.contains(&"apiserver") {
            self.api_url = format!("https://127.0.0.1:{}", self.ports["apiserver"]);
            fs::write(
                &self.kubeconfig,
                kubeconfig_yaml(
                    &self.api_url,
                    &self.ca_pem,
                    &self.admin_cert_pem,
                    &self.admin_key_pem,
                ),
            )?;
        }
        Ok(())
    }

    /// Starts `specs` together, then waits for each to be ready. One that
    /// finds its port taken (see `reserve_port`) is started again on fresh
    /// ports, up to START_ATTEMPTS times.
    fn bring_up(&mut self, specs: Vec<Spec>) -> Result<()> {
        for spec in &specs {
            self.launch(spec)?;
        }
        let group: Vec<&str> = specs.iter().map(|s| s.name).collect();
        for spec in &specs {
            let mut attempt = 1;
            while !self.await_ready(spec, &group)? {
                if attempt == START_ATTEMPTS {
                    bail!(
                        "{} found its port taken {attempt} times\n{}",
                        spec.name,
                        self.diagnose(spec.name)
                    );
                }
                attempt += 1;
                eprintln!(
                    "[testenv] {}: port {:?} taken by another process, starting it again on fresh ports (attempt {attempt})",
                    spec.name,
                    spec.ports.iter().map(|k| self.ports[k]).collect::<Vec<_>>()
                );
                let log = self.log_path(spec.name);
                let _ = fs::rename(&log, log.with_extension(format!("log.{}", attempt - 1)));
                self.lease_ports(spec.ports)?;
                self.launch(spec)?;
            }
        }
        self.specs.extend(specs);
        Ok(())
    }

    /// Kills one component (as SIGKILL: no cleanup); `start` brings it back.
    pub fn stop_component(&mut self, name: &str) {
        let children = self.children.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = children.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped component again with the same arguments, ports and
    /// data (etcd keeps its data) and waits until it answers its probe.
    pub fn start_component(&mut self, name: &str) -> Result<()> {
        let index = self
            .specs
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no component {name}"))?;
        let spec = self.specs.remove(index);
        let started = self
            .launch(&spec)
            .and_then(|()| self.await_ready(&spec, &[name]));
        self.specs.insert(index, spec);
        match started? {
            true => Ok(()),
            false => bail!("{name} found its port taken on restart"),
        }
    }

    /// `stop_component`, `pause`, then `start_component`.
    pub fn restart(&mut self, name: &str, pause: Duration) -> Result<()> {
        self.stop_component(name);
        std::thread::sleep(pause);
        self.start_component(name)
    }

    fn launch(&mut self, spec: &Spec) -> Result<()> {
        let args = (spec.args)(&self.ports);
        self.spawn(spec.name, &spec.bin, &args, &spec.env)
    }

    /// Waits for `spec` to answer its probe: Ok(true) when ready, Ok(false)
    /// when it lost its port, an error (with its log tail) when it exited,
    /// another component exited, or the deadline passed. The other members
    /// of its `group` are checked on their own turn.
    fn await_ready(&mut self, spec: &Spec, group: &[&str]) -> Result<bool> {
        let http = match spec.probe {
            Probe::ApiServer => self.admin_http()?,
            _ => reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .danger_accept_invalid_certs(true)
                .build()?,
        };
        let url = match spec.probe {
            Probe::Http(key, path) => format!("http://127.0.0.1:{}{path}", self.ports[key]),
            Probe::Healthz(key) => format!("https://127.0.0.1:{}/healthz", self.ports[key]),
            Probe::ApiServer => format!("{}/readyz", self.api_url),
        };
        let deadline = Instant::now() + spec.timeout;
        loop {
            // A probe may be answered by whoever holds the port, so the
            // component's own state is checked both before and after it.
            let up = self.state(spec.name)?;
            let answered = matches!(up, State::Running)
                && http.get(&url).send().is_ok_and(|r| r.status().is_success());
            match if answered { self.state(spec.name)? } else { up } {
                State::PortTaken => {
                    self.kill(spec.name);
                    return Ok(false);
                }
                State::Exited(status) => bail!(
                    "{} exited with {status} before it was ready\n{}",
                    spec.name,
                    self.diagnose(spec.name)
                ),
                State::Running if answered => return Ok(true),
                State::Running => {}
            }
            self.check_alive(group)?;
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {:?} ({url} did not answer 2xx)\n{}",
                    spec.name,
                    spec.timeout,
                    self.diagnose(spec.name)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Whether `name`'s process runs, exited, or lost its port.
    fn state(&self, name: &str) -> Result<State> {
        let exited = {
            let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
            match children.iter_mut().find(|(n, _)| n == name) {
                Some((_, child)) => child.try_wait()?,
                None => bail!("{name} was never started"),
            }
        };
        let log = fs::read_to_string(self.log_path(name)).unwrap_or_default();
        Ok(if port_taken(&log) {
            State::PortTaken
        } else if let Some(status) = exited {
            State::Exited(status)
        } else {
            State::Running
        })
    }

    fn kill(&self, name: &str) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, child)) = children.iter_mut().find(|(n, _)| n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One component's status and the last lines of its log, for an error.
    pub fn diagnose(&self, name: &str) -> String {
        let status = {
            let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
            match children.iter_mut().find(|(n, _)| n == name) {
                Some((_, child)) => match child.try_wait() {
                    Ok(Some(status)) => format!("{name} (pid {}) exited with {status}", child.id()),
                    Ok(None) => format!("{name} (pid {}) is running", child.id()),
                    Err(e) => format!("{name} (pid {}): {e}", child.id()),
                },
                None => format!("{name} is not started"),
            }
        };
        let path = self.log_path(name);
        let log = fs::read_to_string(&path).unwrap_or_default();
        format!(
            "{status}; last {LOG_TAIL_LINES} lines of {}:\n{}",
            path.display(),
            tail(&log, LOG_TAIL_LINES)
        )
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

    /// The API server's audit log (with `Options::audit`).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    pub fn process_group(&self) -> i32 {
        self.watchdog
            .as_ref()
            .map(|(c, _)| c.id() as i32)
            .unwrap_or(0)
    }

    /// Starts `name` in the watchdog's process group, logging to `<name>.log`
    /// (replacing an earlier process of that name).
    fn spawn(
        &mut self,
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<()> {
        let log = File::create(self.log_path(name))?;
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
        let children = self.children.get_mut().unwrap_or_else(|e| e.into_inner());
        children.retain(|(n, _)| n != name);
        children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails with its status and log tail if any component but `except` exited.
    fn check_alive(&self, except: &[&str]) -> Result<()> {
        let dead = {
            let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
            let mut dead = None;
            for (name, child) in children.iter_mut() {
                if !except.contains(&name.as_str()) && child.try_wait()?.is_some() {
                    dead = Some(name.clone());
                    break;
                }
            }
            dead
        };
        match dead {
            Some(name) => bail!("{name} exited\n{}", self.diagnose(&name)),
            None => Ok(()),
        }
    }

    /// Polls `ok` until it holds; fails when any component exits or after
    /// `timeout`, quoting the log of `component` (the one expected to make
    /// `what` true).
    fn wait_until(
        &self,
        component: &str,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive(&[])?;
            if ok(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not there after {timeout:?}\n{}",
                    self.diagnose(component)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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

    /// Runs kubectl for startup, killed after `timeout`; on failure the error
    /// quotes kubectl's stderr and the API server's log tail.
    fn kubectl_within(
        &self,
        args: &[&str],
        input: Option<&str>,
        timeout: Duration,
    ) -> Result<String> {
        let (out_path, err_path) = (self.dir.join("kubectl.out"), self.dir.join("kubectl.err"));
        let mut child = Command::new(self.bins.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?)
            .spawn()
            .context("run kubectl")?;
        if let Some(input) = input {
            child.stdin.take().unwrap().write_all(input.as_bytes())?;
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        match status {
            Some(s) if s.success() => Ok(fs::read_to_string(&out_path)?),
            Some(s) => bail!(
                "kubectl {args:?} failed ({s}): {stderr}\n{}",
                self.diagnose("kube-apiserver")
            ),
            None => bail!(
                "kubectl {args:?} still running after {timeout:?}, killed: {stderr}\n{}",
                self.diagnose("kube-apiserver")
            ),
        }
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

    fn create_nodes(&mut self, n: usize, pods: usize) -> Result<()> {
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: kwok-node-{i}\n  annotations: {{node.alpha.kubernetes.io/ttl: \"0\", kwok.x-k8s.io/node: fake}}\n  labels: {{kubernetes.io/hostname: kwok-node-{i}, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}}\nspec:\n  taints: []\nstatus:\n  allocatable: {{cpu: \"32\", memory: 256Gi, pods: \"{pods}\"}}\n  capacity: {{cpu: \"32\", memory: 256Gi, pods: \"{pods}\"}}\n"
            ));
        }
        self.kubectl_within(&["apply", "-f", "-"], Some(&yaml), Duration::from_secs(60))?;
        self.wait_until("kwok", "kwok nodes Ready", Duration::from_secs(60), |c| {
            c.kubectl_within(
                &[
                    "wait",
                    "--for=condition=Ready",
                    "node",
                    "--all",
                    "--timeout=1s",
                    "--request-timeout=5s",
                ],
                None,
                Duration::from_secs(10),
            )
            .is_ok()
        })
    }

    /// The pid of one component (e.g. "external-secrets").
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Pids of every process the environment started and still running.
    pub fn pids(&self) -> Vec<u32> {
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Stops every component (also done by the watchdog when this process ends).
    pub fn stop(&mut self) {
        // Closing the pipe wakes the watchdog, which kills the group.
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
        let children = self.children.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, c) in children.iter_mut() {
            let _ = c.wait();
        }
        children.clear();
        self.leases.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
