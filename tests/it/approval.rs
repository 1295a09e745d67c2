//! Who may approve (issue 14 item 3): the chart's ClusterRoles for people and
//! its ValidatingAdmissionPolicy, installed with `helm install` on the real API
//! server (RBAC authorization), with users the admin impersonates (the API
//! server then sees them in `request.userInfo`, as it would see them logged
//! in). alice and bob may edit and approve, carol may only edit, dave may only
//! view; a GitOps tool acts as a ServiceAccount.

use rekey_testenv as common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::REKEY;
use common::cluster::{Cluster, repo_root};
use common::fixtures::*;
use common::operator::Operator;
use rekey::crd::{Phase, SecretRotation};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
const NAME: &str = "app";

/// Runs kubectl as `user` (impersonated by the admin); Err carries stderr.
fn kubectl_as(
    c: &Cluster,
    user: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new(c.bins.kubectl())
        .arg(format!("--kubeconfig={}", c.kubeconfig.display()))
        .arg(format!("--as={user}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A change `user` must not be able to make, tried with a server-side dry
/// run (admission runs in full, nothing is stored): what is wrong, if the
/// API server admitted it or refused it for another reason than `why`.
fn defect(
    c: &Cluster,
    user: &str,
    what: &str,
    args: &[&str],
    input: Option<&str>,
    why: &str,
) -> Option<String> {
    let mut args = args.to_vec();
    args.push("--dry-run=server");
    match kubectl_as(c, user, &args, input) {
        Ok(_) => Some(format!("{what}: admitted")),
        Err(e) if e.contains(why) => {
            eprintln!("{what}: refused: {}", e.trim());
            None
        }
        Err(e) => Some(format!("{what}: refused, but not because {why:?}: {e}")),
    }
}

/// A kubeconfig of the admin impersonating `user` (kubeconfig field `as`).
fn kubeconfig_as(c: &Cluster, user: &str) -> PathBuf {
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
    kc["users"][0]["user"]["as"] = user.into();
    let path = c.dir.join(format!("kubeconfig-as-{user}"));
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

/// `kubectl rekey` as `user`: (success, stdout and stderr).
fn plugin_as(c: &Cluster, user: &str, ns: &str, args: &[&str]) -> (bool, String) {
    crate::plugin_with(&kubeconfig_as(c, user), ns, args)
}

/// Whether `user` may `verb` SecretRotations (`extra`: e.g. a subresource) in `ns`.
fn can_i(c: &Cluster, user: &str, verb: &str, ns: &str, extra: &[&str]) -> bool {
    let who = format!("--as={user}");
    let mut args = vec![
        "auth",
        "can-i",
        verb,
        "secretrotations.rekey.dev",
        "-n",
        ns,
        &who,
    ];
    args.extend_from_slice(extra);
    // `can-i` answers "no" with a failing exit status.
    c.kubectl(&args).is_ok_and(|out| out.trim() == "yes")
}

/// The SecretRotation, as JSON for `kubectl create -f -`.
fn manifest(ns: &str, requested_by: Option<&str>) -> String {
    let mut spec = unproven_generated_spec("app-creds");
    spec["approval"] = json!({"required": true});
    let mut sr = json!({"apiVersion": "rekey.dev/v1alpha1", "kind": "SecretRotation",
        "metadata": {"name": NAME, "namespace": ns}, "spec": spec});
    if let Some(who) = requested_by {
        sr["metadata"]["annotations"] = json!({"rekey.dev/requested-by": who});
    }
    sr.to_string()
}

fn current(sr: &SecretRotation) -> rekey::crd::RotationStatus {
    sr.status
        .as_ref()
        .and_then(|s| s.rotation.clone())
        .expect("a rotation in progress")
}

#[tokio::test]
async fn only_another_approver_may_approve_and_status_names_both() {
    // The policy, its binding and the ClusterRoles are cluster-wide.
    let opts = common::Options {
        nodes: 1,
        eso: false,
        moto: false,
        ..common::Options::default()
    };
    let (c, client, ns) = common::setup_private("approval", opts).await;
    let c = &c;
    install_crd(c);
    let release_ns = common::namespace_in(c, &client, "rekey-system").await;
    let chart = repo_root().join("charts/rekey").display().to_string();
    let kubeconfig = c.kubeconfig.display().to_string();
    let helm = |args: &[&str]| {
        let bin = c
            .bins
            .all
            .get("REKEY_HELM")
            .expect("REKEY_HELM missing: run `make testenv`");
        let out = Command::new(bin)
            .args(args)
            .args(["--namespace", &release_ns, "--kubeconfig", &kubeconfig])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A real install: the chart renders the policy where the API server serves it.
    let namespaces = format!("namespaces={{{ns}}}");
    helm(&[
        "install",
        "rekey",
        &chart,
        "--set",
        &namespaces,
        "--set",
        "image.tag=test",
        "--set",
        "crds.enabled=false",
    ]);
    let release = helm(&["get", "manifest", "rekey"]);
    assert!(
        release.contains("kind: ValidatingAdmissionPolicy\n")
            && release.contains("kind: ValidatingAdmissionPolicyBinding"),
        "the API server serves ValidatingAdmissionPolicy: the release has the policy"
    );

    // People. Kubernetes' own edit and view roles carry rekey's through
    // aggregation; approving is granted on its own.
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "editors",
        "--clusterrole=edit",
        "--user=alice",
        "--user=bob",
        "--user=carol",
    ])
    .unwrap();
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "approvers",
        "--clusterrole=rekey-approve",
        "--user=alice",
        "--user=bob",
    ])
    .unwrap();
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "viewers",
        "--clusterrole=view",
        "--user=dave",
    ])
    .unwrap();
    common::wait_for("edit and view aggregate rekey's roles", LONG, || async {
        can_i(c, "carol", "patch", &ns, &[]) && can_i(c, "dave", "list", &ns, &[])
    })
    .await;
    assert!(can_i(c, "bob", "approve", &ns, &[]) && can_i(c, "alice", "approve", &ns, &[]));
    assert!(
        !can_i(c, "carol", "approve", &ns, &[]),
        "edit does not approve"
    );
    assert!(!can_i(c, "dave", "patch", &ns, &[]), "view does not edit");
    assert!(
        !can_i(c, "alice", "patch", &ns, &["--subresource=status"]),
        "only rekey writes status, where it records who requested"
    );

    // The policy takes effect shortly after it is created.
    common::wait_for("the admission policy in force", LONG, || async {
        kubectl_as(
            c,
            "alice",
            &["create", "--dry-run=server", "-f", "-"],
            Some(&manifest(&ns, None)),
        )
        .is_err_and(|e| e.contains("ValidatingAdmissionPolicy"))
    })
    .await;

    // A creation is a request: it names its requester, truthfully.
    let mut defects: Vec<String> = vec![];
    let create = ["create", "-f", "-"];
    defects.extend(defect(
        c,
        "alice",
        "a creation without requested-by",
        &create,
        Some(&manifest(&ns, None)),
        "must name its requester",
    ));
    defects.extend(defect(
        c,
        "alice",
        "a creation naming bob as its requester",
        &create,
        Some(&manifest(&ns, Some("bob"))),
        "must name its requester",
    ));
    assert!(defects.is_empty(), "{defects:#?}");
    kubectl_as(c, "alice", &create, Some(&manifest(&ns, Some("alice")))).unwrap();
    let _op = Operator::start(REKEY, c, &ns);
    let sr = wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let first = current(&sr);
    assert_eq!(
        (first.reason.as_str(), first.requested_by.as_deref()),
        ("Created", Some("alice"))
    );
    let id = first.id.clone();

    // What nobody may do, each refused with a sentence saying why.
    let annotate = |kv: &[&str]| -> Vec<String> {
        let mut args = vec!["annotate", "--overwrite", "srot", NAME, "-n", &ns];
        args.extend_from_slice(kv);
        args.into_iter().map(String::from).collect()
    };
    let patch_spec = |spec: Value| -> Vec<String> {
        let body = json!({"spec": spec}).to_string();
        [
            "patch",
            "srot",
            NAME,
            "-n",
            &ns,
            "--type=merge",
            "-p",
            &body,
        ]
        .into_iter()
        .map(String::from)
        .collect()
    };
    let approve = format!("rekey.dev/approve={id}");
    let checks: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "alice approving her own request",
            "alice",
            annotate(&[&approve, "rekey.dev/approved-by=alice"]),
            "separation of duties",
        ),
        (
            "carol, who may not approve, approving",
            "carol",
            annotate(&[&approve, "rekey.dev/approved-by=carol"]),
            "needs the verb approve",
        ),
        (
            "bob approving in alice's name",
            "bob",
            annotate(&[&approve, "rekey.dev/approved-by=alice"]),
            "must name its approver",
        ),
        (
            "bob approving without approved-by",
            "bob",
            annotate(&[&approve]),
            "must name its approver",
        ),
        (
            "carol requesting without requested-by",
            "carol",
            annotate(&["rekey.dev/rotate=now"]),
            "must name its requester",
        ),
        (
            "carol requesting in alice's name",
            "carol",
            annotate(&["rekey.dev/rotate=now", "rekey.dev/requested-by=alice"]),
            "must name its requester",
        ),
        (
            "carol making the request hers without a new request",
            "carol",
            annotate(&["rekey.dev/requested-by=carol"]),
            "changed only with a new request",
        ),
        (
            "carol changing spec.trigger without requested-by",
            "carol",
            patch_spec(json!({"trigger": "CHG1"})),
            "must name its requester",
        ),
        (
            "carol turning approval off",
            "carol",
            patch_spec(json!({"approval": {"required": false}})),
            "may not turn off spec.approval.required",
        ),
    ];
    for (what, user, args, why) in &checks {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        defects.extend(defect(c, user, what, &args, None, why));
    }
    assert!(
        defects.is_empty(),
        "admitted or refused for the wrong reason: {defects:#?}"
    );

    // `kubectl rekey approve` names the caller; alice's own is refused, and
    // the refusal reads as a sentence.
    let (ok, out) = plugin_as(c, "alice", &ns, &["approve", NAME]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "rotation {id} was requested by alice, who may not approve it"
        )) && !out.contains("ErrorResponse"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sr = get_rotation(&client, &ns, NAME).await;
    assert_eq!(
        phase_of(&sr),
        Some(Phase::AwaitingApproval),
        "nothing was approved"
    );

    // bob approves: the rotation proceeds, and status and Events say who
    // requested and who approved.
    let (ok, out) = plugin_as(c, "bob", &ns, &["approve", NAME]);
    assert!(ok && out.contains("approved by bob"), "{out}");
    let sr = wait_phase(&client, &ns, NAME, Phase::Succeeded, LONG).await;
    let status = sr.status.unwrap();
    let last = status.last_rotation.unwrap();
    assert_eq!(last.id, id);
    assert_eq!(
        (last.requested_by.as_deref(), last.approved_by.as_deref()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(status.history[0].approved_by.as_deref(), Some("bob"));
    let notes = event_notes(&client, &ns, NAME).await;
    assert!(
        notes.iter().any(|(r, n)| r == "RotationRequested"
            && n == &format!("Rotation {id} requested: Created by alice")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|(r, n)| r == "Approved"
            && n == &format!("Rotation {id} approved by bob, requested by alice")),
        "{notes:?}"
    );

    // carol requests with `kubectl rekey rotate`, which names her.
    let (ok, out) = plugin_as(c, "carol", &ns, &["rotate", NAME]);
    assert!(ok && out.contains("requested by carol"), "{out}");
    let sr = wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let second = current(&sr);
    assert_eq!(
        (second.reason.as_str(), second.requested_by.as_deref()),
        ("OnDemand", Some("carol"))
    );

    // GitOps: the tool's ServiceAccount changes spec.trigger, and is the
    // requester (docs/gitops.md).
    c.kubectl(&["-n", &ns, "create", "serviceaccount", "gitops"])
        .unwrap();
    let gitops = format!("system:serviceaccount:{ns}:gitops");
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "gitops",
        "--clusterrole=edit",
        &format!("--serviceaccount={ns}:gitops"),
    ])
    .unwrap();
    let commit = |requested_by: Option<&str>| {
        let mut patch = json!({"spec": {"trigger": "CHG0012345"}});
        if let Some(who) = requested_by {
            patch["metadata"] = json!({"annotations": {"rekey.dev/requested-by": who}});
        }
        patch.to_string()
    };
    let patch = |body: &str| {
        kubectl_as(
            c,
            &gitops,
            &["patch", "srot", NAME, "-n", &ns, "--type=merge", "-p", body],
            None,
        )
    };
    let refused = patch(&commit(None)).unwrap_err();
    assert!(refused.contains("must name its requester"), "{refused}");
    patch(&commit(Some(&gitops))).unwrap();
    // alice approves carol's rotation: the requester is the one rekey
    // recorded (carol), not the annotation (now the ServiceAccount).
    kubectl_as(
        c,
        "alice",
        &[
            "annotate",
            "--overwrite",
            "srot",
            NAME,
            "-n",
            &ns,
            &format!("rekey.dev/approve={}", second.id),
            "rekey.dev/approved-by=alice",
        ],
        None,
    )
    .unwrap();
    common::wait_for("carol's rotation succeeded", LONG, || async {
        let s = get_rotation(&client, &ns, NAME).await.status.unwrap();
        s.history
            .first()
            .is_some_and(|h| h.id == second.id && h.result == Phase::Succeeded)
    })
    .await;
    let s = get_rotation(&client, &ns, NAME).await.status.unwrap();
    assert_eq!(
        (
            s.history[0].requested_by.as_deref(),
            s.history[0].approved_by.as_deref()
        ),
        (Some("carol"), Some("alice"))
    );
    // The trigger commit, kept while carol's rotation ran, is served next.
    let sr = wait_phase(&client, &ns, NAME, Phase::AwaitingApproval, LONG).await;
    let third = current(&sr);
    assert_eq!(
        (third.reason.as_str(), third.requested_by.as_deref()),
        ("TriggerChanged", Some(gitops.as_str()))
    );
    let why: Value =
        serde_json::from_str(&plugin_as(c, "dave", &ns, &["why", NAME, "-o", "json"]).1).unwrap();
    assert!(
        why["whatToDo"][0]
            .as_str()
            .unwrap()
            .contains(&format!("not its requester {gitops}")),
        "{why}"
    );
}
