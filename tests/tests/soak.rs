//! The soak in short: `sm-soak --minutes 1` (what `cargo xtask soak` runs for longer) on the
//! real kernel: steady connections across nodes and on one node, workload churn, policy
//! rewrites, one-minute certificates rotating and a controller restart, with nothing allowed
//! failing, nothing growing without bound and everything back at its baseline at the end.
#![cfg(feature = "privileged")]

use tests::*;

#[test]
fn a_one_minute_soak_leaves_nothing_behind_and_fails_no_allowed_connection() {
    let out = std::env::temp_dir().join(format!("sockmesh-soak-{}", std::process::id()));
    let o =
        std::process::Command::new(bin("sm-soak")).args(["--minutes", "1"]).arg("--out").arg(&out).output().unwrap();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        o.status.success(),
        "{}\n{}\n{report}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("summary: soak 1 min"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(report.contains("Nothing grew without bound"), "{report}");
}
