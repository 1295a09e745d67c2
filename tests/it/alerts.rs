//! The chart's alerting rules (`metrics.prometheusRule`, runbooks in
//! docs/alerts.md): rendered by helm, checked by `promtool check rules` and
//! unit-tested by `promtool test rules`, each alert firing and not firing, on
//! input series whose names and labels are copied from a real operator's
//! scrape, so that the rules cannot drift from the metrics rekey exports.

use rekey_testenv as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::REKEY;
use common::cluster::{Binaries, repo_root};
use common::fixtures::*;
use common::operator::Operator;
use rekey::crd::Phase;
use rekey::crd::keys::CONFIRM_ANNOTATION;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
/// The release name the rules are rendered for; its default selector.
const RELEASE: &str = "x";
const JOB: &str = "x-metrics";
/// The operator's namespace, as Prometheus's target labels name it.
const OPERATOR_NS: &str = "rekey-system";

fn tool(key: &str) -> PathBuf {
    let bins = Binaries::load(&repo_root()).unwrap();
    let path = bins
        .all
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing: run `make testenv`"));
    PathBuf::from(path)
}

fn run(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{} {args:?}: {text}", bin.display());
    text
}

/// The PrometheusRule `helm template` renders with `extra` values, if any.
fn prometheus_rule(extra: &[&str]) -> Option<serde_yaml::Value> {
    let chart = repo_root().join("charts/rekey").display().to_string();
    let mut args = vec!["template", RELEASE, chart.as_str()];
    args.extend_from_slice(extra);
    run(&tool("REKEY_HELM"), &args)
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .find(|d| d["kind"].as_str() == Some("PrometheusRule"))
}

fn rules(rule: &serde_yaml::Value) -> Vec<&serde_yaml::Value> {
    rule["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .collect()
}

fn rule_named<'a>(rule: &'a serde_yaml::Value, alert: &str) -> &'a serde_yaml::Value {
    rules(rule)
        .into_iter()
        .find(|r| r["alert"].as_str() == Some(alert))
        .unwrap_or_else(|| panic!("no alert {alert}"))
}

/// Off by default like the ServiceMonitor; labels, alert labels,
/// thresholds and the selector come from values.
#[test]
fn alert_rules_are_off_by_default_and_follow_values() {
    assert!(prometheus_rule(&[]).is_none(), "off by default");
    let rule = prometheus_rule(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=kps",
        "--set",
        "metrics.prometheusRule.alertLabels.team=platform",
        "--set",
        "metrics.prometheusRule.oldValueNotInvalidated.afterSeconds=7200",
        "--set-string",
        "metrics.prometheusRule.selector=job=\"rekey\"",
    ])
    .expect("enabled: rendered");
    assert_eq!(rule["metadata"]["labels"]["release"].as_str(), Some("kps"));
    let all = rules(&rule);
    assert_eq!(all.len(), 6, "{all:?}");
    for r in all {
        let alert = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        assert!(expr.contains("{job=\"rekey\""), "{alert}: {expr}");
        assert!(!expr.contains(JOB), "{alert}: {expr}");
        assert_eq!(r["labels"]["team"].as_str(), Some("platform"), "{alert}");
        assert!(r["labels"]["severity"].as_str().is_some(), "{alert}");
        let runbook = r["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = runbook.rsplit_once('#').unwrap().1;
        assert_eq!(anchor, alert.to_lowercase(), "{alert}");
        assert!(r["annotations"]["summary"].as_str().is_some(), "{alert}");
        assert!(
            r["annotations"]["description"].as_str().is_some(),
            "{alert}"
        );
    }
    let expr = rule_named(&rule, "RekeyOldValueNotInvalidated")["expr"]
        .as_str()
        .unwrap();
    assert!(expr.contains("> 7200"), "{expr}");
    // Every alert has its runbook section, and every section is an alert.
    let doc = std::fs::read_to_string(repo_root().join("docs/alerts.md")).unwrap();
    let sections: Vec<&str> = doc.lines().filter_map(|l| l.strip_prefix("## ")).collect();
    let alerts: Vec<&str> = rules(&rule)
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(sections, alerts, "docs/alerts.md sections");
}

/// The series of one family in a scrape, as `name{labels}` (the value
/// dropped) with the target labels Prometheus adds (`job`, `instance`,
/// and `namespace` where rekey has none), for each sample line that
/// `matches`. Panics when there is none: the rules would use a series
/// rekey does not export.
fn series_of(scrape: &str, family: &str, matches: &str) -> String {
    let line = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            (l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
                && l.contains(matches)
        })
        .unwrap_or_else(|| panic!("no {family} series with {matches} in the scrape:\n{scrape}"));
    let target = format!("job=\"{JOB}\",instance=\"10.0.0.1:8080\"");
    match line.split_once('{') {
        Some((name, rest)) => {
            let labels = &rest[..rest.rfind('}').unwrap()];
            format!("{name}{{{labels},{target}}}")
        }
        None => {
            let name = line.split_whitespace().next().unwrap();
            format!("{name}{{{target},namespace=\"{OPERATOR_NS}\"}}")
        }
    }
}

/// Replaces the value of label `key` in a series.
fn with_label(series: &str, key: &str, value: &str) -> String {
    let start = series
        .find(&format!("{key}=\""))
        .unwrap_or_else(|| panic!("{series} has no label {key}"));
    let from = start + key.len() + 2;
    let end = from + series[from..].find('"').unwrap();
    format!("{}{value}{}", &series[..from], &series[end..])
}

/// The labels of a series, as promtool reports an alert's.
fn labels_of(series: &str) -> BTreeMap<String, String> {
    let inner = &series[series.find('{').unwrap() + 1..series.rfind('}').unwrap()];
    inner
        .split("\",")
        .map(|kv| {
            let (k, v) = kv.split_once("=\"").unwrap();
            (k.to_string(), v.trim_end_matches('"').to_string())
        })
        .collect()
}

/// One expected alert: its labels (the series' plus `severity`) and its
/// annotations, expanded the way Prometheus expands the rule's templates
/// for these labels and `value` (`$value | humanizeDuration`).
fn expected(rule: &serde_yaml::Value, labels: BTreeMap<String, String>, value: &str) -> Value {
    let mut labels = labels;
    labels.insert(
        "severity".into(),
        rule["labels"]["severity"].as_str().unwrap().into(),
    );
    let mut annotations = BTreeMap::new();
    for (k, v) in rule["annotations"].as_mapping().unwrap() {
        let mut text = v.as_str().unwrap().to_string();
        text = text.replace("{{ $value | humanizeDuration }}", value);
        for (lk, lv) in &labels {
            text = text.replace(&format!("{{{{ $labels.{lk} }}}}"), lv);
        }
        assert!(!text.contains("{{"), "unexpanded template: {text}");
        annotations.insert(k.as_str().unwrap().to_string(), text);
    }
    json!({"exp_labels": labels, "exp_annotations": annotations})
}

fn case(alert: &str, at: &str, alerts: Vec<Value>) -> Value {
    json!({"eval_time": at, "alertname": alert, "exp_alerts": alerts})
}

fn input(series: &str, values: &str) -> Value {
    json!({"series": series, "values": values})
}

/// rekey's series in two real states: a failed rotation, a manual rotation
/// waiting for confirmation (grace window and phase start), and after the
/// confirmation, its next scheduled rotation; the operator restarted in
/// between sets the gauges again from status.
async fn real_scrapes() -> String {
    let (c, client, ns) = common::setup("alerts").await;
    let old = common::canary("old");
    scene(c, &client, &ns, &old).await;
    put_secret(
        &client,
        &ns,
        "new-client-secret",
        json!({"value": common::canary("new")}),
    )
    .await;
    let mut op = Operator::start(REKEY, c, &ns);
    let failing = json!({
        "credential": {"generated": {}},
        "oldValueValidFor": "30m",
        "targets": [{"name": "main", "kubernetesSecret": {"name": "failing-secret", "key": "k"}}],
        "proof": {"workloads": [{"kind": "Deployment", "name": "not-there"}], "timeout": "60s"}
    });
    create_rotation(&client, &ns, "failing", failing).await;
    let mut manual = rotation_spec(
        json!({"manual": {"secretRef": {"name": "new-client-secret", "key": "value"}}}),
    );
    manual["schedule"] = json!({"every": "2160h"});
    create_rotation(&client, &ns, "manual", manual).await;
    wait_phase(&client, &ns, "failing", Phase::Failed, LONG).await;
    let sr = wait_phase(&client, &ns, "manual", Phase::AwaitingConfirmation, LONG).await;
    let id = sr.status.unwrap().rotation.unwrap().id;
    let waiting = op.scrape().await;

    // A restarted operator (or a new leader) has the gauges again without
    // a transition: set from status at its first reconcile.
    op.restart();
    let phase = format!(
        "rekey_rotation_phase{{namespace=\"{ns}\",name=\"manual\",phase=\"AwaitingConfirmation\"}} 1"
    );
    common::wait_for("gauges after a restart", LONG, || async {
        let s = op.scrape().await;
        s.contains(&phase)
            && s.contains("rekey_phase_started_timestamp_seconds{")
            && s.contains("name=\"failing\",phase=\"Failed\"")
    })
    .await;
    let restarted = op.scrape().await;
    assert!(restarted.contains("\nrekey_leader 1\n"), "{restarted}");

    annotate_rotation(&client, &ns, "manual", CONFIRM_ANNOTATION, &id).await;
    wait_phase(&client, &ns, "manual", Phase::Succeeded, LONG).await;
    let next =
        format!("rekey_next_rotation_timestamp_seconds{{namespace=\"{ns}\",name=\"manual\"}}");
    common::wait_for("the next scheduled rotation", LONG, || async {
        op.scrape().await.contains(&next)
    })
    .await;
    let done = op.scrape().await;
    // The gauges of a rotation in progress go with it.
    for gone in [
        "rekey_phase_started_timestamp_seconds{",
        "rekey_grace_seconds_left{",
        "rekey_grace_window_seconds{",
    ] {
        assert!(!done.contains(gone), "{gone} after the rotation:\n{done}");
    }
    format!("{waiting}\n{done}")
}

#[tokio::test]
async fn alert_rules_pass_promtool_on_series_of_a_real_scrape() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("alerts");
    std::fs::create_dir_all(&dir).unwrap();
    let rule = prometheus_rule(&["--set", "metrics.prometheusRule.enabled=true"]).unwrap();
    let rules_file = dir.join("rules.yaml");
    let groups = json!({"groups": serde_json::to_value(&rule["spec"]["groups"]).unwrap()});
    std::fs::write(&rules_file, serde_yaml::to_string(&groups).unwrap()).unwrap();
    let promtool = tool("REKEY_PROMTOOL");
    run(&promtool, &["check", "rules", rules_file.to_str().unwrap()]);

    // Every rekey_ family and phase the rules name is exported.
    let exprs: Vec<&str> = rules(&rule)
        .iter()
        .map(|r| r["expr"].as_str().unwrap())
        .collect();
    let mut used: Vec<&str> = exprs
        .iter()
        .flat_map(|e| e.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')))
        .filter(|w| w.starts_with("rekey_"))
        .collect();
    used.sort();
    used.dedup();
    for name in &used {
        assert!(
            rekey::metrics::FAMILIES.contains(&name.strip_prefix("rekey_").unwrap()),
            "the rules use {name}, which rekey does not export"
        );
    }
    for phase in ["Failed", "Invalidating", "AwaitingConfirmation"] {
        assert!(Phase::ALL.iter().any(|p| p.as_str() == phase));
        assert!(exprs.iter().any(|e| e.contains(phase)), "{phase}");
    }

    let scrape = real_scrapes().await;
    for name in &used {
        assert!(
            scrape.contains(&format!("\n{name}{{")) || scrape.contains(&format!("\n{name} ")),
            "{name} is not in a real scrape"
        );
    }
    let failed = series_of(&scrape, "rekey_rotation_phase", "phase=\"Failed\"");
    let confirming = series_of(
        &scrape,
        "rekey_rotation_phase",
        "phase=\"AwaitingConfirmation\"",
    );
    let started = series_of(
        &scrape,
        "rekey_phase_started_timestamp_seconds",
        "name=\"manual\"",
    );
    let left = series_of(&scrape, "rekey_grace_seconds_left", "name=\"manual\"");
    let window = series_of(&scrape, "rekey_grace_window_seconds", "name=\"manual\"");
    let next = series_of(
        &scrape,
        "rekey_next_rotation_timestamp_seconds",
        "name=\"manual\"",
    );
    let leader = series_of(&scrape, "rekey_leader", "");
    let up = format!("up{{job=\"{JOB}\",instance=\"10.0.0.1:8080\",namespace=\"{OPERATOR_NS}\"}}");
    let rolling_out = with_label(&confirming, "phase", "AwaitingRollout");
    let pending = with_label(&failed, "phase", "Pending");
    let standby = with_label(&leader, "instance", "10.0.0.2:8080");
    let none = Vec::new;
    // `max by (job, namespace)`: the labels the alert keeps.
    let leader_labels: BTreeMap<String, String> = labels_of(&leader)
        .into_iter()
        .filter(|(k, _)| k == "job" || k == "namespace")
        .collect();

    let failed_alert = rule_named(&rule, "RekeyRotationFailed");
    let grace = rule_named(&rule, "RekeyGraceWindowAtRisk");
    let unconfirmed = rule_named(&rule, "RekeyOldValueNotInvalidated");
    let overdue = rule_named(&rule, "RekeyScheduleOverdue");
    let absent = rule_named(&rule, "RekeyOperatorAbsent");
    let no_leader = rule_named(&rule, "RekeyNoLeader");
    // promtool's clock starts at 0 (the Unix epoch): timestamps are minutes from there.
    let tests = json!([
        {
            // Failed until a new rotation starts at 10m.
            "interval": "1m",
            "input_series": [input(&failed, "1x9 stale"), input(&pending, "_x10 1x10"),
                             input(&confirming, "1x20")],
            "alert_rule_test": [
                case("RekeyRotationFailed", "5m", vec![expected(failed_alert, labels_of(&failed), "")]),
                case("RekeyRotationFailed", "15m", none()),
            ]
        },
        {
            // A 30 min window counting down from 24 min left during the
            // rollout (at risk below 6 min, after 18 min), then
            // AwaitingConfirmation from 25m: no longer at risk.
            "interval": "1m",
            "input_series": [input(&window, "1800x40"), input(&left, "1440-60x40"),
                             input(&rolling_out, "1x24 stale"), input(&confirming, "_x25 1x15")],
            "alert_rule_test": [
                case("RekeyGraceWindowAtRisk", "17m", none()),
                case("RekeyGraceWindowAtRisk", "20m", vec![expected(grace, labels_of(&left), "4m 0s")]),
                case("RekeyGraceWindowAtRisk", "30m", none()),
            ]
        },
        {
            // AwaitingConfirmation since 0, then confirmed at 90m.
            "interval": "1m",
            "input_series": [input(&started, "0x89 stale"), input(&confirming, "1x89 stale")],
            "alert_rule_test": [
                case("RekeyOldValueNotInvalidated", "30m", none()),
                case("RekeyOldValueNotInvalidated", "65m", vec![expected(unconfirmed, labels_of(&started), "1h 5m 0s")]),
                case("RekeyOldValueNotInvalidated", "95m", none()),
            ]
        },
        {
            // Due at 10m; from 80m a rotation waits for confirmation (the
            // alert above, not this one).
            "interval": "1m",
            "input_series": [input(&next, "600x100"), input(&confirming, "_x80 1x20")],
            "alert_rule_test": [
                case("RekeyScheduleOverdue", "30m", none()),
                case("RekeyScheduleOverdue", "75m", vec![expected(overdue, labels_of(&next), "1h 5m 0s")]),
                case("RekeyScheduleOverdue", "85m", none()),
            ]
        },
        {
            // Scraped until 10m, then down.
            "interval": "1m",
            "input_series": [input(&up, "1x10 0x20")],
            "alert_rule_test": [
                case("RekeyOperatorAbsent", "12m", none()),
                case("RekeyOperatorAbsent", "20m", vec![expected(absent, BTreeMap::new(), "")]),
            ]
        },
        {
            // Two replicas; the leader steps down at 10m and nobody takes over.
            "interval": "1m",
            "input_series": [input(&leader, "1x10 0x20"), input(&standby, "0x30")],
            "alert_rule_test": [
                case("RekeyNoLeader", "12m", none()),
                case("RekeyNoLeader", "20m", vec![expected(no_leader, leader_labels, "")]),
            ]
        },
    ]);
    let test_file = dir.join("rules_test.yaml");
    let test = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": tests,
    });
    std::fs::write(&test_file, serde_yaml::to_string(&test).unwrap()).unwrap();
    let out = run(&promtool, &["test", "rules", test_file.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");
}
