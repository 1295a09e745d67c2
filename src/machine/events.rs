//! Kubernetes Events about SecretRotations, published in order by one
//! background task, so that a rotation never waits for an Event to be
//! written (Events are a record for people, not part of the proof).

use futures::StreamExt;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tracing::warn;

/// Queues Events for the publishing task.
#[derive(Clone)]
pub struct Events {
    queue: UnboundedSender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the task that publishes through `recorder`, one at a time.
    pub fn start(recorder: Recorder) -> Self {
        let (queue, mut pending) = unbounded::<(Event, ObjectReference)>();
        tokio::spawn(async move {
            while let Some((event, about)) = pending.next().await {
                if let Err(e) = recorder.publish(&event, &about).await {
                    warn!(error = %e, "could not publish event");
                }
            }
        });
        Self { queue }
    }

    /// Publishes `event` about `about` soon, after the ones queued before.
    pub fn publish(&self, event: Event, about: ObjectReference) {
        let _ = self.queue.unbounded_send((event, about));
    }
}
