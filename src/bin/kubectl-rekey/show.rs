//! What `status` and `history` print.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use rekey::crd::{Phase, RotationSummary, SecretRotation};

pub fn ago(t: Option<&Time>, now: Timestamp) -> String {
    let Some(t) = t else { return "-".into() };
    let secs = now.duration_since(t.0).as_secs();
    let (n, unit) = match secs.abs() {
        s if s < 120 => (s, "s"),
        s if s < 7200 => (s / 60, "m"),
        s if s < 172_800 => (s / 3600, "h"),
        s => (s / 86400, "d"),
    };
    if secs < 0 {
        format!("in {n}{unit}")
    } else {
        format!("{n}{unit} ago")
    }
}

pub fn phase(p: Option<Phase>) -> String {
    p.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into())
}

pub fn print_table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

pub fn timeline(sr: &SecretRotation, now: Timestamp) {
    let status = sr.status.clone().unwrap_or_default();
    println!(
        "Name:       {}/{}",
        sr.namespace().unwrap_or_default(),
        sr.name_any()
    );
    println!("Phase:      {}", phase(status.phase));
    if let Some(rot) = &status.rotation {
        println!(
            "Rotation:   {} ({}), requested {}{}",
            rot.id,
            rot.reason,
            ago(rot.requested_at.as_ref().map(|t| Time(t.0)).as_ref(), now),
            by(" by ", rot.requested_by.as_deref())
        );
        if let Some(who) = &rot.approved_by {
            println!("Approved by: {who}");
        }
        if let Some(until) = &rot.old_value_valid_until {
            println!(
                "Old value valid until: {} ({})",
                until.0,
                ago(Some(until), now)
            );
        }
        for p in &rot.phases {
            println!("  ✓ {:<22} {:>8.1}s", format!("{:?}", p.phase), p.seconds);
        }
        let since = rot
            .phase_started_at
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs_f64())
            .unwrap_or(0.0);
        println!("  ▶ {:<22} {:>8.1}s so far", phase(status.phase), since);
        for t in &rot.targets {
            println!("  target {} version {}", t.name, t.version);
        }
        print_changes(&rot.changes);
        print_proof(&rot.proof);
        for c in &rot.consumers {
            println!("  consumer {} {}: {}", c.kind, c.name, c.handling);
        }
    } else if let Some(last) = &status.last_rotation {
        println!(
            "Last:       {} {:?} {} ({:.0}s){}{}",
            last.id,
            last.result,
            ago(last.finished_at.as_ref(), now),
            last.duration_seconds,
            by(", requested by ", last.requested_by.as_deref()),
            by(", approved by ", last.approved_by.as_deref())
        );
        print_changes(&last.changes);
        print_proof(&last.proof);
        for (i, p) in last.phases.iter().enumerate() {
            // The phase a rotation failed in is its last: shown once, as failed.
            let failed = last
                .failure
                .as_ref()
                .filter(|f| i + 1 == last.phases.len() && f.phase == p.phase);
            match failed {
                Some(f) => println!(
                    "  ✗ {:<22} {:>8.1}s  {}: {}",
                    format!("{:?}", p.phase),
                    p.seconds,
                    f.reason,
                    f.message
                ),
                None => println!("  ✓ {:<22} {:>8.1}s", format!("{:?}", p.phase), p.seconds),
            }
        }
        if let Some(f) = last
            .failure
            .as_ref()
            .filter(|f| last.phases.last().is_none_or(|p| p.phase != f.phase))
        {
            println!("  ✗ {:?}: {}: {}", f.phase, f.reason, f.message);
        }
    }
    println!(
        "Next:       {}",
        status
            .next_rotation_at
            .as_ref()
            .map(|t| format!("{} ({})", t.0, ago(Some(t), now)))
            .unwrap_or("-".into())
    );
    if let Some(p) = &status.pending_request {
        println!("Pending:    {p} (served after the current rotation)");
    }
    for c in &status.conditions {
        println!(
            "Condition:  {}={} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
}

/// `prefix` and the user, or nothing.
fn by(prefix: &str, who: Option<&str>) -> String {
    who.map(|w| format!("{prefix}{w}")).unwrap_or_default()
}

pub fn history_rows(h: &[RotationSummary], now: Timestamp) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "ROTATION".into(),
        "RESULT".into(),
        "REASON".into(),
        "FINISHED".into(),
        "DURATION".into(),
        "PHASES".into(),
        "FAILURE".into(),
    ]];
    for r in h {
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|p| format!("{:?} {:.1}s", p.phase, p.seconds))
            .collect();
        rows.push(vec![
            r.id.clone(),
            format!("{:?}", r.result),
            r.reason.clone(),
            ago(r.finished_at.as_ref(), now),
            format!("{:.1}s", r.duration_seconds),
            phases.join(", "),
            r.failure
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_default(),
        ]);
    }
    rows
}

/// The change requests (`approval.changeRequests`): number, environment,
/// state and approval as last read back, the window, how each was closed.
fn print_changes(changes: &[rekey::crd::ChangeStatus]) {
    for c in changes {
        let number = if c.number.is_empty() {
            "(opening)"
        } else {
            &c.number
        };
        let window = match (&c.window_start, &c.window_end) {
            (Some(s), Some(e)) => format!(", window {} to {}", s.0, e.0),
            (None, Some(e)) => format!(", window until {}", e.0),
            (Some(s), None) => format!(", window from {}", s.0),
            (None, None) => String::new(),
        };
        let closed = if c.closed.is_empty() {
            String::new()
        } else {
            format!(", closed {}", c.closed)
        };
        println!(
            "  change {number} ({}): {}, approval {}{window}{closed}",
            c.environment, c.state, c.approval
        );
    }
}

/// The proof per item, grouped by cluster (this one first).
fn print_proof(proof: &[rekey::crd::ProofItem]) {
    if proof.is_empty() {
        return;
    }
    println!("Proof:");
    let mut clusters: Vec<&str> = proof.iter().map(|p| p.cluster.as_str()).collect();
    clusters.sort();
    clusters.dedup();
    let remote = clusters.len() > 1;
    for cluster in clusters {
        let indent = match (cluster.is_empty(), remote) {
            (true, false) => "  ",
            (true, true) => {
                println!("  this cluster:");
                "    "
            }
            (false, _) => {
                println!("  cluster {cluster}:");
                "    "
            }
        };
        for p in proof.iter().filter(|p| p.cluster == cluster) {
            match p.proven {
                true => println!("{indent}✓ {} {}", p.kind, p.name),
                false => println!("{indent}… {} {}: {}", p.kind, p.name, p.waiting_for),
            }
        }
    }
}
