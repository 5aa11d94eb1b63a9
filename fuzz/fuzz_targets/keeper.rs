//! The udp fd keeper's messages: the spec the keeper process parses from its
//! environment, and the answer (fd counts + SCM_RIGHTS ancillary data) an agent
//! decodes when it fetches the fds.
//!
//! Input: byte 0 bit 7 set: the rest is a spec. Otherwise the rest is an answer:
//! bits 0-1 of byte 0 say how many of the next bytes are the message (0-3), the
//! remainder is the control buffer, bit 2 is the kernel's MSG_CTRUNC. The same
//! bytes, read as fd numbers, also go through an encode/decode round trip.
#![no_main]

use std::os::fd::RawFd;

use flannel_udp::keeper::fuzzing::{decode_reply, format_spec, parse_spec, reply_control, MAX_FDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };

    if flags & 0x80 != 0 {
        let text = String::from_utf8_lossy(rest);
        if let Some((nt, ns)) = parse_spec(&text) {
            assert!(nt >= 1 && nt + ns <= MAX_FDS, "{text:?}");
        }
        // What spawn writes, the keeper reads, whatever the device is called.
        let (nt, ns) = (usize::from(flags & 0x7f), rest.len() % 4);
        let want = (nt >= 1 && nt + ns <= MAX_FDS).then_some((nt, ns));
        assert_eq!(parse_spec(&format_spec(nt, ns, &text)), want);
        return;
    }

    let n = usize::from(flags & 3).min(rest.len());
    let (msg, control) = rest.split_at(n);
    let ctrunc = flags & 4 != 0;
    let (fds, verdict) = decode_reply(msg, control, ctrunc);
    if let Ok(ntun) = verdict {
        assert!(!ctrunc && msg.len() == 2);
        assert_eq!(ntun, usize::from(msg[0]));
        assert_eq!(fds.len(), usize::from(msg[0]) + usize::from(msg[1]));
    }

    // What the keeper sends, the agent decodes to the same fds and split.
    let fds: Vec<RawFd> = rest
        .chunks_exact(4)
        .take(MAX_FDS)
        .map(|b| RawFd::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if fds.is_empty() {
        return;
    }
    let nt = 1 + usize::from(flags >> 3) % fds.len();
    let counts = [nt as u8, (fds.len() - nt) as u8];
    let (got, verdict) = decode_reply(&counts, &reply_control(&fds), false);
    assert_eq!(got, fds);
    assert_eq!(verdict, Ok(nt));
});
