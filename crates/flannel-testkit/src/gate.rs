//! The one FLANNEL_E2E gate: a test whose prerequisite is missing is skipped with a
//! line saying why, except under `FLANNEL_E2E=1` (CI), where it fails. Every skip
//! and every failure reads the same: `SKIP <test>: <reason> ...` or
//! `<test>: FLANNEL_E2E=1 but <reason>`.

use std::fmt::Display;
use std::path::Path;
use std::process::Command;

/// When this is `1`, a missing prerequisite fails the test instead of skipping it.
pub const E2E_ENV: &str = "FLANNEL_E2E";

/// Whether missing prerequisites must fail tests (`FLANNEL_E2E=1`).
pub fn e2e_required() -> bool {
    std::env::var(E2E_ENV).is_ok_and(|v| v == "1")
}

/// The running test's name (the test harness names each test's thread after it).
pub fn this_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

/// A prerequisite of `test` is missing: returns false (skip) after saying why, or
/// panics under `FLANNEL_E2E=1`.
pub fn skip_or_fail(test: &str, reason: impl Display) -> bool {
    if e2e_required() {
        panic!("{test}: {E2E_ENV}=1 but {reason}");
    }
    eprintln!("SKIP {test}: {reason} (set {E2E_ENV}=1 to make this a failure)");
    false
}

/// Whether the process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `name` is an executable on PATH (or in /usr/sbin, /sbin, which a
/// non-login root shell may lack).
pub fn tool_exists(name: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(name).is_file());
    found
}

/// Root and every tool in `tools`, else [`skip_or_fail`] naming all that is missing.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if !is_root() {
        missing.push("root".into());
    }
    missing.extend(
        tools
            .iter()
            .filter(|t| !tool_exists(t))
            .map(|t| t.to_string()),
    );
    missing.is_empty() || skip_or_fail(test, format!("missing {}", missing.join(", ")))
}

/// Root and the `ip` tool: what every namespace test needs.
pub fn privileged(test: &str) -> bool {
    if !is_root() {
        return skip_or_fail(test, "needs root");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return skip_or_fail(test, "needs the `ip` tool (iproute2)");
    }
    true
}

/// A file a test needs, with the Debian package that has it.
pub fn require_file(path: &str, package: &str) -> bool {
    Path::new(path).is_file()
        || skip_or_fail(
            &this_test(),
            format!("{path} not found (Debian package {package})"),
        )
}
