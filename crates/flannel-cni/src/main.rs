//! `flannel`: the CNI plugin binary. All logic is in the library; this only wires
//! the process's environment, stdin, stdout and exit code to it.

#![forbid(unsafe_code)]

use std::io::Write as _;

fn main() {
    let outcome = flannel_cni::run(&|k| std::env::var(k).ok(), &mut std::io::stdin().lock());
    // If stdout or stderr is gone there is nobody left to tell; the exit code still
    // reports the outcome.
    let _ = std::io::stderr().write_all(&outcome.stderr);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&outcome.stdout);
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
