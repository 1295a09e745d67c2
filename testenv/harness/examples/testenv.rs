//! `make cluster`: starts the test environment in the foreground of this
//! process (scripts/cluster.sh puts it in the background) and writes
//! `.cluster/kubeconfig` and `.cluster/env` (another directory of the
//! repository with `REKEY_CLUSTER_DIR`, e.g. a second cluster for
//! `make demo-multicluster`). Killing this process stops every component:
//! its watchdog reaps the whole process group.

use std::fs;

use rekey_testenv::cluster;

fn main() -> anyhow::Result<()> {
    let repo = cluster::repo_root();
    let dir = repo.join(std::env::var("REKEY_CLUSTER_DIR").unwrap_or_else(|_| ".cluster".into()));
    let state = dir.join("state");
    let _ = fs::remove_dir_all(&state);
    let c = cluster::Cluster::start(&state, &cluster::Options::default())?;
    fs::copy(&c.kubeconfig, dir.join("kubeconfig"))?;
    fs::write(
        dir.join("env"),
        format!(
            "# source this file: . .cluster/env\nexport KUBECONFIG={kc}\nexport PATH={bin}:$PATH\n",
            kc = dir.join("kubeconfig").display(),
            bin = c.bins.kube_bin.display()
        ),
    )?;
    fs::write(dir.join("ready"), &c.api_url)?;
    println!("cluster ready at {}", c.api_url);
    loop {
        std::thread::park();
    }
}
