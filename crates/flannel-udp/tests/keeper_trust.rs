//! The agent takes a keeper's fds only from a keeper it can trust: a process of
//! another user that got to the keeper's abstract socket name first (it is a name
//! any user of the network namespace can bind) is refused, not believed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use flannel_testkit::{in_netns, require, TestNetns};
use flannel_udp::keeper;

const IMPOSTOR_ENV: &str = "FLANNEL_TEST_KEEPER_IMPOSTOR";
const DEV: &str = "flannel0";

/// Not a test of its own: the body of the impostor process the test below starts
/// as user `nobody` (ignored unless that process runs it).
#[test]
#[ignore = "helper process for a_keeper_of_another_user_is_refused"]
fn impostor() {
    let Ok(dev) = std::env::var(IMPOSTOR_ENV) else {
        return;
    };
    use nix::sys::socket::{
        accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = UnixAddr::new_abstract(format!("flannel-udp-keeper/{dev}").as_bytes()).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).unwrap();
    listen(&fd, Backlog::new(1).unwrap()).unwrap();
    println!("listening");
    // Hold the connection until the parent gives up on it.
    let _conn = accept(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(30));
}

#[test]
fn a_keeper_of_another_user_is_refused() {
    if !require("a_keeper_of_another_user_is_refused", &["ip", "setpriv"]) {
        return;
    }
    let ns = TestNetns::new("keeper").unwrap();
    let me = std::env::current_exe().unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&me)
        .args(["--exact", "impostor", "--include-ignored", "--nocapture"])
        .env(IMPOSTOR_ENV, DEV)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the impostor did not start"
        );
    }
    let got = in_netns(ns.name(), || keeper::fetch(DEV));
    // Our own child, by its handle.
    let _ = child.kill();
    let _ = child.wait();
    let err = got
        .err()
        .expect("fds from another user's keeper must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
}
