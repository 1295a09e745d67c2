//! Leader election on a coordination.k8s.io Lease, for running more than one
//! replica: only the holder reconciles. A leader that cannot renew in time
//! exits, so two replicas never act at once for longer than a lease.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

const LEASE_NAME: &str = "rekey-leader";
const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub struct LeaderElection {
    api: Api<Lease>,
    identity: String,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            identity: identity.into(),
        }
    }

    /// Tries once to take or renew the lease; true when this replica holds it.
    async fn try_acquire(&self) -> kube::Result<bool> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            now.as_second() > t.0.as_second() + duration
        });
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(LEASE_SECONDS);
        // resourceVersion is kept: a concurrent update makes this fail with 409.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica is the leader, then keeps renewing in the
    /// background; the process exits if the lease is lost.
    pub async fn acquire_and_hold(self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        info!(identity = %self.identity, "became leader");
        tokio::spawn(async move {
            let mut last_renewed = std::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match self.try_acquire().await {
                    Ok(true) => last_renewed = std::time::Instant::now(),
                    Ok(false) => {
                        warn!("lost the leader lease; exiting");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        warn!(error = %e, "could not renew the leader lease");
                        if last_renewed.elapsed() > Duration::from_secs(LEASE_SECONDS as u64) {
                            warn!("leader lease expired; exiting");
                            std::process::exit(1);
                        }
                    }
                }
            }
        });
    }
}
