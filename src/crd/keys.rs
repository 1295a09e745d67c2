//! Every annotation and label key rekey reads or writes. Users set the first
//! six on a SecretRotation; rekey writes the others.

/// Set by a person (or `kubectl rekey rotate`) on a SecretRotation to request
/// a rotation now; any new value is a new request.
pub const ROTATE_ANNOTATION: &str = "rekey.dev/rotate";
/// Approves the rotation whose id it holds (`spec.approval.required`).
pub const APPROVE_ANNOTATION: &str = "rekey.dev/approve";
/// Who made the request (a rotate annotation, a `spec.trigger` change, a
/// creation): the user name as the API server knows it. The chart's
/// ValidatingAdmissionPolicy requires it on every request and lets it name
/// only the user making the request; rekey copies it into status and Events.
pub const REQUESTED_BY_ANNOTATION: &str = "rekey.dev/requested-by";
/// Who approved (set with `rekey.dev/approve`): the policy lets it name only
/// the approving user, who must be allowed the verb `approve` on
/// secretrotations and must not be the requester.
pub const APPROVED_BY_ANNOTATION: &str = "rekey.dev/approved-by";
/// Confirms that the old value was invalidated by hand (manual source).
pub const CONFIRM_ANNOTATION: &str = "rekey.dev/confirm-invalidated";
/// Asks rekey to stop the rotation whose id it holds and write the previous
/// value back (as `onFailure: Rollback`); refused once invalidation began.
pub const ROLLBACK_ANNOTATION: &str = "rekey.dev/rollback";
/// On a Secret rekey wrote (kubernetesSecret target): the rotation id of the write.
pub const WRITTEN_BY_ANNOTATION: &str = "rekey.dev/written-by-rotation";
/// On a Secret in another namespace: the namespaces whose SecretRotations may
/// write it (comma-separated). The grant is made where the Secret lives.
pub const ALLOW_ROTATION_FROM_ANNOTATION: &str = "rekey.dev/allow-rotation-from";
/// Annotation ESO puts on every Secret it writes.
pub const ESO_DATA_HASH_ANNOTATION: &str = "reconcile.external-secrets.io/data-hash";
/// On the Leases that serialize rotations of one thing: the SecretRotation
/// holding the claim.
pub const CLAIM_LABEL: &str = "rekey.dev/claimed-by";
/// Label of the write-ahead record Secret.
pub const WAL_LABEL: &str = "rekey.dev/write-ahead-record";
/// Prefix of the pod-template annotation that restarts a workload; the rest
/// names the SecretRotation (see `restart_annotation`).
pub const RESTART_ANNOTATION_PREFIX: &str = "rotation.rekey.dev/";
/// ESO's annotation on an ExternalSecret that requests a refresh when its value changes.
pub const FORCE_SYNC_ANNOTATION: &str = "force-sync";

/// The pod-template annotation that restarts a workload, keyed per
/// SecretRotation so two rotations of one workload do not undo each other.
pub fn restart_annotation(rotation_name: &str) -> String {
    if rotation_name.len() <= 63 {
        format!("{RESTART_ANNOTATION_PREFIX}{rotation_name}")
    } else {
        // Annotation names are at most 63 characters: shorten, keep unique.
        let hash = crate::fingerprint::fnv1a(rotation_name.as_bytes());
        format!("{RESTART_ANNOTATION_PREFIX}{}-{hash}", &rotation_name[..46])
    }
}

/// Finalizer on every SecretRotation: a deletion mid-rotation lets the
/// rotation reach its end (proof and invalidation, or a safe failure) before
/// the object and its write-ahead record go.
pub const FINALIZER: &str = "rekey.dev/finish-rotation";
