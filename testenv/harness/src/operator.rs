//! Runs the real `rekey` binary against the test cluster, one per test and
//! namespace, with its log captured for canary checks.
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
            // Tests log at debug; the benchmark as the chart does (rekey's default
            // filter, through REKEY_OPERATOR_RUST_LOG).
            .env(
                "RUST_LOG",
                std::env::var("REKEY_OPERATOR_RUST_LOG").unwrap_or_else(|_| {
                    "debug,kube=info,hyper=info,tower=info,rustls=info,reqwest=info,h2=info".into()
                }),
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

    /// Everything the operator logged, over every restart.
    pub fn logs(&self) -> String {
        (0..=self.restarts)
            .map(|i| {
                fs::read_to_string(
                    self.dir
                        .join(format!("rekey-{}-{}-{i}.log", self.namespace, self.id)),
                )
                .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
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
        self.kill();
    }
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
