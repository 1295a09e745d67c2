//! Runs the real `rekey` binary against the test cluster, one per test and
//! namespace, with its log captured for canary checks: when an `Operator` is
//! dropped, its log, its metrics page, the Events it recorded and the status
//! of the SecretRotations it watched are scanned for every canary of the
//! test process (see [`crate::leaks`]); a hit fails the test.
//!
//! The binary's path comes from the caller: Cargo tells only the rekey
//! package's integration tests where it built it (`CARGO_BIN_EXE_rekey`).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cluster::{Cluster, free_port};

pub struct Operator {
    bin: PathBuf,
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_port: u16,
    namespace: String,
    kubeconfig: PathBuf,
    pgid: i32,
    restarts: u32,
    dir: PathBuf,
    /// Distinguishes operators in one namespace (log file names).
    id: u32,
    extra_args: Vec<String>,
    /// Extra environment of the next start (see `set_env`).
    env: Vec<(String, String)>,
    /// The cluster admin's kubeconfig: the leak scan reads Events and
    /// statuses with it, whatever rights the operator itself has.
    admin_kubeconfig: PathBuf,
    /// Whether dropping it scans for canaries (see `without_leak_check`).
    leak_check: bool,
    /// Its hits are made on purpose (see `leaking_on_purpose`).
    deliberate: bool,
}

impl Operator {
    /// Starts `bin run` (the rekey binary) watching only `namespace` (the
    /// whole cluster when it is empty).
    pub fn start(bin: impl AsRef<Path>, c: &Cluster, namespace: &str) -> Operator {
        Self::start_with_kubeconfig(bin, c, namespace, c.kubeconfig.clone())
    }

    pub fn start_with_kubeconfig(
        bin: impl AsRef<Path>,
        c: &Cluster,
        namespace: &str,
        kubeconfig: PathBuf,
    ) -> Operator {
        Self::start_with_args(bin, c, namespace, kubeconfig, &[])
    }

    pub fn start_with_args(
        bin: impl AsRef<Path>,
        c: &Cluster,
        namespace: &str,
        kubeconfig: PathBuf,
        extra_args: &[&str],
    ) -> Operator {
        let mut op = Self::unstarted(bin, c, namespace, kubeconfig, extra_args);
        op.spawn();
        op
    }

    fn unstarted(
        bin: impl AsRef<Path>,
        c: &Cluster,
        namespace: &str,
        kubeconfig: PathBuf,
        extra_args: &[&str],
    ) -> Operator {
        Operator {
            bin: bin.as_ref().to_path_buf(),
            id: rand::random::<u32>() % 1_000_000,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            env: vec![],
            admin_kubeconfig: c.kubeconfig.clone(),
            leak_check: true,
            deliberate: false,
            child: None,
            log: PathBuf::new(),
            metrics_port: free_port(),
            namespace: namespace.into(),
            kubeconfig,
            pgid: c.process_group(),
            restarts: 0,
            dir: c.dir.clone(),
        }
    }

    fn spawn(&mut self) {
        self.log = self.dir.join(format!(
            "rekey-{}-{}-{}.log",
            self.namespace, self.id, self.restarts
        ));
        let log = fs::File::create(&self.log).unwrap();
        let mut command = Command::new(&self.bin);
        command.arg("run");
        // Tests poll every 500 ms unless they say otherwise.
        if !self.extra_args.iter().any(|a| a.starts_with("--poll")) {
            command.arg("--poll=500ms");
        }
        // An empty namespace: the whole cluster (the chart's cluster mode).
        if !self.namespace.is_empty() {
            command.arg(format!("--namespaces={}", self.namespace));
        }
        let child = command
            .arg(format!("--metrics-addr=127.0.0.1:{}", self.metrics_port))
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            // Tests log rekey at its most verbose level, other crates at
            // debug, except: the HTTP and TLS stacks, whose trace output is
            // raw request and response bytes (copies rekey cannot reach, see
            // docs/secrets.md) and debug connection chatter; and kube_client,
            // whose debug is one line per API request (method, URL, status:
            // no body) and made logs 70 times larger. The benchmark logs as
            // the chart does (REKEY_OPERATOR_RUST_LOG).
            .env(
                "RUST_LOG",
                std::env::var("REKEY_OPERATOR_RUST_LOG").unwrap_or_else(|_| TEST_LOG_FILTER.into()),
            )
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(self.pgid)
            .spawn()
            .expect("start rekey");
        self.child = Some(child);
    }

    /// Simulates a crash: SIGKILL, no cleanup of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `bin run` like [`Operator::start`], with `env` added to its
    /// environment (e.g. `REKEY_FAILPOINT`, see src/failpoint.rs).
    pub fn start_with_env(
        bin: impl AsRef<Path>,
        c: &Cluster,
        namespace: &str,
        env: &[(&str, &str)],
    ) -> Operator {
        let mut op = Self::unstarted(bin, c, namespace, c.kubeconfig.clone(), &[]);
        op.set_env(env);
        op.spawn();
        op
    }

    /// The extra environment of the next (re)start, replacing the last one.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Whether the process has ended on its own (a crash), without waiting.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Starts it again after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        self.restarts += 1;
        self.spawn();
    }

    /// The operator's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The operator's resident memory now (KiB), from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid()?, "VmRSS")
    }

    /// Everything the operator logged, over every restart. Panics when a
    /// registered canary is in it (see [`crate::leaks`]).
    pub fn logs(&self) -> String {
        let logs = self.log_files().map(|(_, text)| text).collect::<Vec<_>>();
        if self.leak_check {
            let hits: Vec<_> = self
                .log_files()
                .flat_map(|(name, text)| crate::leaks::scan(&text, &format!("log {name}")))
                .collect();
            fail_on(&hits);
        }
        logs.join("\n")
    }

    /// Each log file (name, text), over every restart.
    fn log_files(&self) -> impl Iterator<Item = (String, String)> + '_ {
        (0..=self.restarts).map(|i| {
            let name = format!("rekey-{}-{}-{i}.log", self.namespace, self.id);
            let text = fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
            (name, text)
        })
    }

    /// Scans for every registered canary: the log (stdout and stderr, every
    /// restart), the metrics page when it still runs, the Events rekey
    /// recorded and the status of every SecretRotation in the namespaces it
    /// watched (the whole cluster when it watched it all). Adds the figures to
    /// `target/reliability/canary.json`.
    pub fn leaks(&mut self) -> Vec<crate::leaks::Hit> {
        let page = self.metrics_page();
        self.scan_all(page)
    }

    /// The metrics page, while the process runs and answers.
    fn metrics_page(&mut self) -> Option<String> {
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if running {
            http_get(self.metrics_port, "/metrics")
        } else {
            None
        }
    }

    fn scan_all(&mut self, page: Option<String>) -> Vec<crate::leaks::Hit> {
        let start = std::time::Instant::now();
        let mut figures = crate::leaks::Scanned::default();
        let mut hits = vec![];
        if let Some(page) = page {
            figures.metrics_page = true;
            hits.extend(crate::leaks::scan(&page, "metrics"));
        }
        for (name, text) in self.log_files() {
            figures.log_bytes += text.len() as u64;
            hits.extend(crate::leaks::scan(&text, &format!("log {name}")));
        }
        let namespaces: Vec<String> = self
            .extra_args
            .iter()
            .find_map(|a| a.strip_prefix("--namespaces="))
            .unwrap_or(&self.namespace)
            .split(',')
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        match api_objects(self.admin_kubeconfig.clone(), namespaces) {
            Some(objects) => {
                figures.events = Some(objects.events.len() as u64);
                figures.statuses = objects.statuses.len() as u64;
                for (place, text) in objects.events.iter().chain(&objects.statuses) {
                    hits.extend(crate::leaks::scan(text, place));
                }
            }
            None => figures.events = None,
        }
        figures.hits = hits.len() as u64;
        figures.deliberate = self.deliberate;
        figures.millis = start.elapsed().as_secs_f64() * 1000.0;
        crate::leaks::record(figures);
        hits
    }

    /// No canary scan when dropped, nor when its log is read.
    pub fn without_leak_check(&mut self) {
        self.leak_check = false;
    }

    /// Its hits are counted apart in the figures (`deliberate_hits`): for
    /// the test that leaks a canary on purpose to show the scan finds it.
    pub fn leaking_on_purpose(&mut self) {
        self.deliberate = true;
    }

    /// GET of one of rekey's own endpoints (`/readyz`, `/healthz`): the
    /// status code, or None while nothing answers.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        reqwest::get(&url).await.ok().map(|r| r.status().as_u16())
    }

    pub async fn scrape(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        for _ in 0..50 {
            if let Ok(r) = reqwest::get(&url).await
                && let Ok(t) = r.text().await
            {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("metrics endpoint did not answer");
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if !self.leak_check {
            self.kill();
            return;
        }
        // The metrics page is read before the kill, the log after it (then
        // complete, panic messages included).
        let page = self.metrics_page();
        self.kill();
        let hits = self.scan_all(page);
        if std::thread::panicking() {
            for h in &hits {
                eprintln!("secret value leaked: {h}");
            }
        } else {
            fail_on(&hits);
        }
    }
}

/// rekey's log filter in tests: see `spawn`.
pub const TEST_LOG_FILTER: &str = "debug,rekey=trace,kube_client=info,hyper=info,hyper_util=info,h2=info,tower=info,tower_http=info,rustls=info,reqwest=info";

/// Fails the test on any hit, naming the canaries' tags and places only.
fn fail_on(hits: &[crate::leaks::Hit]) {
    if !hits.is_empty() {
        let list: Vec<String> = hits.iter().map(|h| h.to_string()).collect();
        panic!(
            "a secret value leaked (suite-wide canary capture): {}",
            list.join("; ")
        );
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (no runtime needed, usable in Drop):
/// the body, or None when nothing answers within 2 s.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Some(
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(text),
    )
}

/// What rekey wrote to the API server, as JSON texts with their place.
struct ApiObjects {
    events: Vec<(String, String)>,
    statuses: Vec<(String, String)>,
}

/// The Events rekey recorded and the SecretRotation statuses in
/// `namespaces` (all when empty), read as the cluster admin on a thread of
/// its own (callable from Drop inside any runtime); None when the API server
/// does not answer within 10 s.
fn api_objects(kubeconfig: PathBuf, namespaces: Vec<String>) -> Option<ApiObjects> {
    use k8s_openapi::api::core::v1::Event;
    use kube::api::{Api, ApiResource, DynamicObject, ListParams};
    let read = async move {
        rekey::install_crypto_provider();
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).ok()?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .ok()?;
        let client = kube::Client::try_from(config).ok()?;
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.into_iter().map(Some).collect()
        };
        let ar = ApiResource::erase::<rekey::crd::SecretRotation>(&());
        let mut out = ApiObjects {
            events: vec![],
            statuses: vec![],
        };
        for ns in scopes {
            let (events, rotations): (Api<Event>, Api<DynamicObject>) = match &ns {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced_with(client.clone(), ns, &ar),
                ),
                None => (Api::all(client.clone()), Api::all_with(client.clone(), &ar)),
            };
            // Only what rekey recorded: other components' Events are not
            // rekey's output.
            for e in events.list(&ListParams::default()).await.ok()?.items {
                let by_rekey = e.reporting_component.as_deref() == Some("rekey")
                    || e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("rekey");
                if by_rekey {
                    let place = format!(
                        "Event {}/{}",
                        e.metadata.namespace.clone().unwrap_or_default(),
                        e.metadata.name.clone().unwrap_or_default()
                    );
                    out.events.push((place, serde_json::to_string(&e).ok()?));
                }
            }
            // Only the status: the spec and metadata are the user's.
            for r in rotations.list(&ListParams::default()).await.ok()?.items {
                let place = format!(
                    "status of SecretRotation {}/{}",
                    r.metadata.namespace.clone().unwrap_or_default(),
                    r.metadata.name.clone().unwrap_or_default()
                );
                out.statuses.push((
                    place,
                    r.data
                        .get("status")
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                ));
            }
        }
        Some(out)
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .ok()?
        })
    })
    .join()
    .ok()
    .flatten()
}

/// One `Vm*` field of /proc/PID/status (KiB): "VmRSS", "VmHWM".
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used, in seconds, from
/// /proc/PID/stat (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some((utime + stime) as f64 / 100.0)
}
