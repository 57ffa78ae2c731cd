//! Malformed and hostile NBD input, each case checked against the reply the
//! NBD spec requires, and the rule that a hostile client ends only its own
//! connection: the daemon, other connections and all data stay intact.
//!
//! Handshake-level cases libnbd refuses to send are driven over a raw
//! socket; request-level cases go through nbdsh (python3-libnbd) with
//! strict mode off.

// Test frames are tiny: length casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_UNKNOWN: u32 = 0x8000_0006;
const ERR_TOO_BIG: u32 = 0x8000_0009;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META: u32 = 4;

/// A raw NBD client speaking bytes.
struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connects and reads the greeting; sends `flags`.
    fn connect(d: &Blockd, flags: u32) -> Self {
        let mut s = UnixStream::connect(d.nbd_socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]) & 3,
            3,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Self { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).unwrap();
        (opt, kind, data)
    }

    /// True when the server closes the connection within `secs` (a read
    /// that times out is not a close).
    fn closed_within(&mut self, secs: u64) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(secs)))
            .unwrap();
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// GO to `export`; returns (size, flags). Panics on error replies.
    fn go(&mut self, export: &str) -> (u64, u16) {
        self.option(7, &go_data(export));
        let mut info = None;
        loop {
            let (_, kind, data) = self.reply();
            match kind {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    info = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                REP_INFO => {}
                REP_ACK => return info.expect("NBD_INFO_EXPORT"),
                other => panic!(
                    "GO failed with {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    fn ext_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = 0x21e4_1c71u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Reads one extended chunk: (flags, type, cookie, offset, payload).
    fn ext_chunk(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
        let mut h = [0u8; 32];
        self.s.read_exact(&mut h).expect("extended reply");
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            0x6e8a_278c,
            "extended reply magic"
        );
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize;
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u64::from_be_bytes(h[16..24].try_into().unwrap()),
            data,
        )
    }
}

fn go_data(export: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Writes a known pattern with qemu-io and checks it is still there.
fn assert_data_intact(d: &Blockd) {
    qemu_io(&d.uri("vol1"), &["read -P 0x77 0 1M"]);
}

fn daemon_with_data() -> Option<Blockd> {
    if !require_tools(&["qemu-io"]) {
        return None;
    }
    let d = Blockd::start();
    d.create("vol1", "8M");
    qemu_io(&d.uri("vol1"), &["write -P 0x77 0 1M", "flush"]);
    Some(d)
}

#[test]
fn handshake_rules() {
    let Some(d) = daemon_with_data() else { return };

    // Unknown client flags: the server drops the connection.
    let mut c = Raw::connect(&d, 3 | 1 << 7);
    assert!(c.closed(), "unknown client flags must end the connection");

    // Bad option magic: dropped.
    let mut c = Raw::connect(&d, 3);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed(), "bad option magic must end the connection");

    // Unknown option: ERR_UNSUP, and parsing continues.
    let mut c = Raw::connect(&d, 3);
    c.option(0x4242, b"whatever data");
    let (opt, kind, _) = c.reply();
    assert_eq!((opt, kind), (0x4242, ERR_UNSUP));
    // Oversized option data: drained and refused, and parsing continues.
    c.option(6, &vec![0u8; 100_000]);
    assert_eq!(c.reply().1, ERR_TOO_BIG);
    // GO for an unknown export: ERR_UNKNOWN, and the connection goes on.
    c.option(7, &go_data("nope"));
    let (_, kind, msg) = c.reply();
    assert_eq!(kind, ERR_UNKNOWN, "{}", String::from_utf8_lossy(&msg));
    // INFO for the same: ERR_UNKNOWN.
    c.option(6, &go_data("nope"));
    assert_eq!(c.reply().1, ERR_UNKNOWN);
    // Malformed GO payload (length runs past the data): ERR_INVALID.
    c.option(7, &[0, 0, 0, 99, b'x']);
    assert_eq!(c.reply().1, ERR_INVALID);
    // SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID.
    c.option(10, &meta_data("vol1", &["base:allocation"]));
    assert_eq!(c.reply().1, ERR_INVALID);
    // STRUCTURED_REPLY with data: ERR_INVALID.
    c.option(8, b"x");
    assert_eq!(c.reply().1, ERR_INVALID);
    // STARTTLS: refused by policy (the Unix socket has no TLS).
    c.option(5, &[]);
    assert_eq!(c.reply().1, 0x8000_0002);
    // Now a proper GO still works on the same connection.
    let (size, flags) = c.go("vol1");
    assert_eq!(size, 8 << 20);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    c.request(0, 0, 9, 0, 4096, &[]);
    let (err, cookie) = c.simple();
    assert_eq!((err, cookie), (0, 9));
    let mut data = vec![0; 4096];
    c.s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x77));

    // EXPORT_NAME for an unknown export: disconnect.
    let mut c = Raw::connect(&d, 3);
    c.option(1, b"nope");
    assert!(
        c.closed(),
        "EXPORT_NAME for an unknown export must disconnect"
    );

    // EXPORT_NAME for a known one, without NO_ZEROES: 124 zero bytes follow.
    let mut c = Raw::connect(&d, 1);
    c.option(1, b"vol1");
    let mut b = [0u8; 8 + 2 + 124];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 8 << 20);
    assert!(b[10..].iter().all(|&z| z == 0));

    // ABORT: ACK, then the server closes.
    let mut c = Raw::connect(&d, 3);
    c.option(2, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert!(c.closed());

    // A client that vanishes mid-option harms nothing.
    let mut c = Raw::connect(&d, 3);
    c.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    drop(c);

    assert_data_intact(&d);
}

#[test]
fn transmission_rules_raw() {
    let Some(d) = daemon_with_data() else { return };
    // A healthy connection stays open through everything below.
    let mut good = Raw::connect(&d, 3);
    good.go("vol1");

    let mut c = Raw::connect(&d, 3);
    let (size, _) = c.go("vol1");
    // Unknown command type: EINVAL.
    c.request(0, 42, 1, 0, 0, &[]);
    assert_eq!(c.simple(), (22, 1));
    // Unknown command flag: EINVAL.
    c.request(1 << 9, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 2));
    // DF without structured replies: EINVAL.
    c.request(1 << 2, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 3));
    // WRITE past the end: ENOSPC; its payload is consumed and nothing is written.
    c.request(0, 1, 4, size - 512, 1024, &[0xee; 1024]);
    assert_eq!(c.simple(), (28, 4));
    // READ past the end: EINVAL. Offset overflow too.
    c.request(0, 0, 5, size, 1, &[]);
    assert_eq!(c.simple(), (22, 5));
    c.request(0, 0, 6, u64::MAX, 2, &[]);
    assert_eq!(c.simple(), (22, 6));
    // BLOCK_STATUS without a negotiated context: EINVAL.
    c.request(0, 7, 7, 0, 4096, &[]);
    assert_eq!(c.simple(), (22, 7));
    // READ over 32 MiB: EOVERFLOW, connection stays.
    c.request(0, 0, 8, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.simple(), (75, 8));
    // FLUSH with a length: EINVAL.
    c.request(0, 3, 9, 0, 10, &[]);
    assert_eq!(c.simple(), (22, 9));
    // The connection still works.
    c.request(0, 0, 10, 0, 16, &[]);
    assert_eq!(c.simple(), (0, 10));
    let mut b = [0u8; 16];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0x77; 16]);

    // Bad request magic: hard disconnect.
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed(), "bad request magic must end the connection");

    // A WRITE announcing a payload over 32 MiB: hard disconnect.
    let mut c = Raw::connect(&d, 3);
    c.go("vol1");
    c.request(0, 1, 1, 0, (32 << 20) + 4096, &[0xee; 4096]);
    assert!(c.closed(), "a payload over 32 MiB must end the connection");

    // A client that dies mid-payload harms nothing.
    let mut c = Raw::connect(&d, 3);
    c.go("vol1");
    c.request(0, 1, 1, 0, 65536, &[0xee; 1000]);
    drop(c);

    // The healthy connection and the data are untouched.
    good.request(0, 0, 77, 0, 4096, &[]);
    assert_eq!(good.simple(), (0, 77));
    let mut data = vec![0; 4096];
    good.s.read_exact(&mut data).unwrap();
    assert!(
        data.iter().all(|&b| b == 0x77),
        "data changed by a hostile client"
    );
    assert_data_intact(&d);
}

/// A client that stops in the middle of a WRITE's payload and stays
/// connected holds nothing up: a forced delete of its volume ends the
/// connection and completes, other clients go on, and a shutdown ends
/// with it still stalled.
#[test]
fn a_client_stalled_mid_payload_holds_nothing_up() {
    let Some(mut d) = daemon_with_data() else {
        return;
    };
    d.create("stall", "8M");
    let mut stalled = Raw::connect(&d, 3);
    stalled.go("stall");
    stalled.request(0, 1, 1, 0, 65536, &[0xee; 1000]);
    // The header and the first bytes are in: the server waits for the rest.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    d.ok(&["volume", "delete", "stall", "--force"]);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the forced delete waited {:?} for a stalled client",
        t0.elapsed()
    );
    assert!(
        stalled.closed_within(5),
        "the stalled client was not disconnected"
    );
    assert!(!d.ok(&["volume", "list"]).contains("stall"));

    // Stalled on a volume that stays, the client does not keep the daemon
    // from stopping (and nothing it half sent lands).
    let mut stalled = Raw::connect(&d, 3);
    stalled.go("vol1");
    stalled.request(0, 1, 2, 0, 65536, &[0xee; 1000]);
    std::thread::sleep(Duration::from_millis(200));
    assert_data_intact(&d);
    assert!(d.terminate().success());
    drop(stalled);
}

impl Raw {
    /// READs `len` bytes at `offset` with simple replies.
    fn read_at(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        self.request(0, 0, cookie, offset, len as u32, &[]);
        assert_eq!(self.simple(), (0, cookie), "READ at {offset}");
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).unwrap();
        data
    }
}

/// A pattern no two nearby bytes of which repeat in step with 4 KiB.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

/// Large WRITEs, whose payload goes from the socket into the volume as it
/// arrives: stored exactly however the client cuts and paces its sends; a
/// large WRITE that is invalid answers its error with its payload
/// consumed; one cut short by the client's death ends only its own
/// connection and leaves nothing but old or new bytes in its range.
#[test]
fn large_writes_raw() {
    let Some(d) = daemon_with_data() else { return };
    let mut good = Raw::connect(&d, 3);
    good.go("vol1");
    let mut c = Raw::connect(&d, 3);
    let (size, _) = c.go("vol1");

    // 1 MiB and 1000 bytes at an offset aligned to nothing, in uneven
    // pieces with pauses between some of them.
    let data = pattern((1 << 20) + 1000, 3);
    let at = (2 << 20) + 4096 + 100;
    c.request(0, 1, 1, at, data.len() as u32, &[]);
    for (i, piece) in data.chunks(70_001).enumerate() {
        c.s.write_all(piece).unwrap();
        if i % 4 == 1 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(c.simple(), (0, 1));
    assert!(
        c.read_at(2, at, data.len()) == data,
        "large write not stored exactly"
    );
    // And through another connection (the page cache is the volume's).
    assert!(
        good.read_at(3, at, data.len()) == data,
        "large write not seen by another client"
    );

    // Back to back, with the next request right behind each payload.
    let second = pattern(512 << 10, 9);
    let third = pattern(300 << 10, 17);
    let mut both = Vec::new();
    for (cookie, offset, payload) in [(4u64, 5u64 << 20, &second), (5, (6 << 20) + 512, &third)] {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        both.extend_from_slice(&b);
    }
    c.s.write_all(&both).unwrap();
    let mut answered = [c.simple(), c.simple()];
    answered.sort_unstable();
    assert_eq!(answered, [(0, 4), (0, 5)]);
    assert!(
        c.read_at(6, 5 << 20, second.len()) == second,
        "first of two back-to-back writes"
    );
    assert!(
        c.read_at(7, (6 << 20) + 512, third.len()) == third,
        "second of two back-to-back writes"
    );

    // Past the end: ENOSPC, its payload consumed, nothing written.
    c.request(0, 1, 8, size - 4096, 512 << 10, &[0xee; 512 << 10]);
    assert_eq!(c.simple(), (28, 8));
    // With FUA (durable before the reply): exact as well.
    let fua = pattern(400 << 10, 23);
    c.request(1, 1, 9, 7 << 20, fua.len() as u32, &fua);
    assert_eq!(c.simple(), (0, 9));
    assert!(c.read_at(10, 7 << 20, fua.len()) == fua, "FUA large write");

    // A client that dies 600 KiB into a 1 MiB write.
    let mut dying = Raw::connect(&d, 3);
    dying.go("vol1");
    dying.request(0, 1, 1, 4 << 20, 1 << 20, &[0xaa; 600 << 10]);
    std::thread::sleep(Duration::from_millis(200));
    drop(dying);
    std::thread::sleep(Duration::from_millis(200));
    let range = good.read_at(11, 4 << 20, 1 << 20);
    assert!(
        range[..600 << 10].iter().all(|&b| b == 0 || b == 0xaa),
        "a write cut short left bytes that are neither old nor new"
    );
    assert!(
        range[600 << 10..].iter().all(|&b| b == 0),
        "bytes the dead client never sent were written"
    );

    // Nothing else changed, and both other connections go on.
    assert!(c.read_at(12, at, data.len()) == data);
    assert!(good.read_at(13, 5 << 20, second.len()) == second);
    assert_data_intact(&d);
}

/// A large WRITE that fails part-way (the volume's file system fills up
/// under it) answers ENOSPC and consumes the rest of its payload: the
/// connection goes on with the next request, and once there is space the
/// same write succeeds.
#[test]
fn a_large_write_that_fails_midway_answers_and_the_connection_goes_on() {
    if !(require_tools(&["mount", "umount", "dd"])
        && skip_unless(is_root(), "needs root to mount a small tmpfs"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (small, _fs) = common::disk::small_tmpfs(tmp.path(), "24m");
    let d = Blockd::start_in(&small);
    d.create("vol1", "64M");
    let mut c = Raw::connect(&d, 3);
    c.go("vol1");
    // Fill the file system until less than 1 MiB is left.
    let filler = small.join("filler");
    common::disk::fill_up(&filler);
    sh(&format!("truncate -s -768K {}", filler.display()));

    let data = pattern(4 << 20, 5);
    c.request(0, 1, 1, 8 << 20, data.len() as u32, &data);
    let (errno, cookie) = c.simple();
    assert_eq!((errno, cookie), (28, 1), "a write beyond the space left");
    // The payload was consumed whole: the next request is read as one.
    let zero = c.read_at(2, 32 << 20, 4096);
    assert!(zero.iter().all(|&b| b == 0));

    // Space again: the same write succeeds, exactly.
    std::fs::remove_file(&filler).unwrap();
    c.request(0, 1, 3, 8 << 20, data.len() as u32, &data);
    assert_eq!(c.simple(), (0, 3));
    assert!(
        c.read_at(4, 8 << 20, data.len()) == data,
        "write after space came back"
    );
}

#[test]
fn extended_headers_raw() {
    let Some(d) = daemon_with_data() else { return };
    let mut c = Raw::connect(&d, 3);
    c.option(11, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    // STRUCTURED_REPLY after extended headers is refused with EXT_HEADER_REQD.
    c.option(8, &[]);
    assert_eq!(c.reply().1, 0x8000_000a);
    c.option(10, &meta_data("vol1", &["base:allocation"]));
    let (_, kind, data) = c.reply();
    assert_eq!(kind, REP_META);
    let ctx = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(c.reply().1, REP_ACK);
    c.go("vol1");

    // WRITE with PAYLOAD_LEN: a NONE chunk with DONE acknowledges it.
    c.ext_request(1 << 5, 1, 1, 4 << 20, 4096, &[0x42; 4096]);
    let (flags, kind, cookie, offset, data) = c.ext_chunk();
    assert_eq!(
        (flags, kind, cookie, offset, data.len()),
        (1, 0, 1, 4 << 20, 0)
    );
    // READ: one OFFSET_DATA chunk.
    c.ext_request(0, 0, 2, 4 << 20, 4096, &[]);
    let (flags, kind, cookie, _, data) = c.ext_chunk();
    assert_eq!((flags & 1, kind, cookie), (1, 1, 2));
    assert_eq!(u64::from_be_bytes(data[..8].try_into().unwrap()), 4 << 20);
    assert!(data[8..].iter().all(|&b| b == 0x42));
    // READ of a hole: one OFFSET_HOLE chunk.
    c.ext_request(0, 0, 3, 6 << 20, 65536, &[]);
    let (_, kind, _, _, data) = c.ext_chunk();
    assert_eq!(kind, 2);
    assert_eq!(u32::from_be_bytes(data[8..12].try_into().unwrap()), 65536);
    // BLOCK_STATUS: 64-bit descriptors (BLOCK_STATUS_EXT).
    c.ext_request(0, 7, 4, 0, 8 << 20, &[]);
    let (flags, kind, _, _, data) = c.ext_chunk();
    assert_eq!((flags & 1, kind), (1, 6));
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), ctx);
    let n = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
    assert_eq!(data.len(), 8 + 16 * n);
    let first_len = u64::from_be_bytes(data[8..16].try_into().unwrap());
    let first_flags = u64::from_be_bytes(data[16..24].try_into().unwrap());
    assert_eq!(
        (first_len, first_flags),
        (1 << 20, 0),
        "first 1 MiB is data"
    );
    // An error reply is a structured error chunk.
    c.ext_request(0, 0, 5, 9 << 20, 1, &[]);
    let (_, kind, _, _, data) = c.ext_chunk();
    assert_eq!(kind, 0x8001);
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), 22);
    // A payload on a command that takes none is consumed, then EINVAL.
    c.ext_request(1 << 5, 4, 6, 0, 100, &[1; 100]);
    let (_, kind, cookie, _, data) = c.ext_chunk();
    assert_eq!((kind, cookie), (0x8001, 6));
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), 22);
    c.ext_request(0, 0, 7, 0, 16, &[]);
    let (_, kind, _, _, data) = c.ext_chunk();
    assert_eq!(kind, 1);
    assert_eq!(&data[8..], &[0x77; 16]);
}

const NBDSH_REQUESTS: &str = r#"
import errno, nbd, sys
uri = sys.argv[1]

def expect(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Error carries the errno name, e.g. "EINVAL".
        if e.errno != errno.errorcode[want]:
            raise SystemExit("%s: got %s (%s), want %s" % (what, e.errno, e, errno.errorcode[want]))
        print("ok", what, e.errno)
        return
    raise SystemExit("%s: succeeded, want %s" % (what, errno.errorcode[want]))

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
h.set_strict_mode(0)
size = h.get_size()
assert h.can_meta_context("base:allocation")

expect(lambda: h.pread(512, size - 256), errno.EINVAL, "READ past the end")
expect(lambda: h.pwrite(b"x" * 512, size - 256), errno.ENOSPC, "WRITE past the end")
expect(lambda: h.zero(4096, size), errno.ENOSPC, "WRITE_ZEROES past the end")
expect(lambda: h.trim(4096, size), errno.EINVAL, "TRIM past the end")
expect(lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL, "BLOCK_STATUS past the end")
expect(lambda: h.cache(4096, size), errno.EINVAL, "CACHE past the end")
expect(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, "READ with REQ_ONE flag")
expect(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF), errno.EINVAL, "WRITE with DF flag")
expect(lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL, "TRIM with NO_HOLE flag")
expect(lambda: h.flush(nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, "FLUSH with REQ_ONE flag")
expect(lambda: h.pread(512, 0, 1 << 12), errno.EINVAL, "READ with an unknown flag")

# Valid requests with every allowed flag still work on the same connection.
# (Past the first MiB, which holds the pattern checked at the end.)
base = 2 << 20
h.pwrite(b"\x33" * 4096, base, nbd.CMD_FLAG_FUA)
assert h.pread(4096, base, nbd.CMD_FLAG_DF) == b"\x33" * 4096
h.zero(4096, base, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(4096, base + 4096, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(8192, base) == b"\0" * 8192
h.trim(4096, base, nbd.CMD_FLAG_FUA)
h.cache(65536, 0)
h.flush()
seen = []
h.block_status(65536, 0, lambda ctx, off, ents, err: seen.append(ents), nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0]) == 2, seen
assert h.pread(512, 0) == b"\x77" * 512
print("ok valid requests")

# BLOCK_STATUS with no context negotiated.
h2 = nbd.NBD()
h2.connect_uri(uri)
h2.set_strict_mode(0)
expect(lambda: h2.block_status(4096, 0, lambda *a: 0), errno.EINVAL, "BLOCK_STATUS without a context")

# Simple replies only (no structured replies): errors still right.
h3 = nbd.NBD()
h3.set_request_structured_replies(False)
h3.connect_uri(uri)
h3.set_strict_mode(0)
expect(lambda: h3.pread(512, size), errno.EINVAL, "READ past the end (simple replies)")
expect(lambda: h3.pwrite(b"x", size), errno.ENOSPC, "WRITE past the end (simple replies)")
assert h3.pread(512, 0) == b"\x77" * 512

# Option mode: GO and INFO for an unknown export fail, then a good GO works.
h4 = nbd.NBD()
h4.set_opt_mode(True)
h4.connect_uri(uri)
h4.set_export_name("no-such-volume")
expect(lambda: h4.opt_info(), errno.ENOENT, "INFO for an unknown export")
expect(lambda: h4.opt_go(), errno.ENOENT, "GO for an unknown export")
h4.set_export_name("vol1")
h4.opt_go()
assert h4.pread(512, 0) == b"\x77" * 512
print("ok option mode")
"#;

#[test]
fn transmission_rules_nbdsh() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let Some(d) = daemon_with_data() else { return };
    let out = nbdsh(NBDSH_REQUESTS, &[&d.uri("vol1")]);
    assert!(out.contains("ok option mode"), "{out}");
    assert_data_intact(&d);
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// What one client can make the daemon hold is bounded: replies it does
/// not read stop the reading of its requests, connections beyond
/// `--nbd-max-connections` are closed at once, and one that never
/// finishes its handshake is closed after 30 s. Other clients are served
/// throughout.
#[test]
fn hostile_clients_are_bounded() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let d = Blockd::start_with(None, &["--nbd-max-connections", "4"]);
    d.create("vol1", "64M");
    qemu_io(&d.uri("vol1"), &["write -P 0x77 0 1M", "flush"]);
    // Silent from the start: not even its flags.
    let mut silent = UnixStream::connect(d.nbd_socket()).unwrap();
    let opened = Instant::now();

    // READs of 32 MiB, sent as fast as the socket takes them, replies
    // never read.
    let mut greedy = vec![Raw::connect(&d, 3)];
    greedy[0].go("vol1");
    let base = rss(d.pid());
    let sent = flood_reads(&mut greedy, 5);
    let grown = rss(d.pid()).saturating_sub(base);
    // Without a bound, the daemon read every request (hundreds, 32 MiB
    // of reply each) and grew by gigabytes.
    assert!(
        grown < 512 << 20,
        "{sent} unread READs of 32 MiB grew the daemon by {} MiB",
        grown >> 20
    );
    assert_data_intact(&d);

    // Four connections at most: the greedy one, the silent one and two
    // more; a fifth is closed before its greeting.
    let mut two: Vec<Raw> = (0..2).map(|_| Raw::connect(&d, 3)).collect();
    let mut fifth = UnixStream::connect(d.nbd_socket()).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(fifth.read(&mut b), Ok(0) | Err(_)),
        "a fifth connection was served"
    );
    assert!(d.log().contains("NBD connection refused"), "{}", d.log());
    // One goes: a new client is served again.
    drop(two.pop());
    drop(greedy);
    served_within_20s(
        &d.uri("vol1"),
        "read -P 0x77 0 1M",
        "no client served after slots were freed",
    );

    // The silent connection is closed at the handshake limit (30 s).
    silent
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    let mut more = [0u8; 1];
    assert!(
        matches!(silent.read(&mut more), Ok(0) | Err(_)),
        "a silent client kept its connection"
    );
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_secs(25) && after < Duration::from_secs(40),
        "closed after {after:?}"
    );
    drop(two);
}

/// Sends 32 MiB READ headers on each of `clients` as fast as their
/// sockets take them, for `secs` seconds, never reading a reply; returns
/// how many went out.
fn flood_reads(clients: &mut [Raw], secs: u64) -> u64 {
    flood(clients, secs, 0, 32 << 20)
}

/// Sends headers of `command` over `len` bytes from offset 0 on each of
/// `clients` as fast as their sockets take them, for `secs` seconds,
/// never reading a reply; returns how many went out.
fn flood(clients: &mut [Raw], secs: u64, command: u16, len: u32) -> u64 {
    let header = |cookie: u64| {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    };
    let mut pending: Vec<(Vec<u8>, usize)> = clients.iter().map(|_| (header(0), 0)).collect();
    let mut sent = 0u64;
    let until = Instant::now() + Duration::from_secs(secs);
    for c in clients.iter() {
        c.s.set_nonblocking(true).unwrap();
    }
    while Instant::now() < until {
        let mut any = false;
        for (c, (buf, done)) in clients.iter_mut().zip(pending.iter_mut()) {
            match c.s.write(&buf[*done..]) {
                Ok(n) => {
                    any = true;
                    *done += n;
                    if *done == buf.len() {
                        sent += 1;
                        *buf = header(sent);
                        *done = 0;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    sent
}

/// What many clients hold together is bounded by `--nbd-max-memory`:
/// each connection alone may hold some 200 MiB of READ data its client
/// never reads, and six such clients would take more than a gigabyte.
/// Bounded, they slow each other down, and once they go, the memory they
/// held is free again for a well-behaved client's largest requests.
#[test]
fn many_hostile_clients_are_bounded_together() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let d = Blockd::start_with(None, &["--nbd-max-memory", "64M"]);
    d.create("vol1", "64M");
    // Data everywhere: a READ's reply is the whole 32 MiB.
    qemu_io(&d.uri("vol1"), &["write -P 0x77 0 64M", "flush"]);
    let mut greedy: Vec<Raw> = (0..6)
        .map(|_| {
            let mut r = Raw::connect(&d, 3);
            r.go("vol1");
            r
        })
        .collect();
    let base = rss(d.pid());
    let sent = flood_reads(&mut greedy, 6);
    assert!(sent >= 6, "only {sent} READs went out");
    let grown = rss(d.pid()).saturating_sub(base);
    assert!(
        grown < 256 << 20,
        "{sent} unread READs of 32 MiB on 6 connections grew the daemon by {} MiB",
        grown >> 20
    );
    assert!(d.log().contains("--nbd-max-memory"), "{}", d.log());
    // The control API is not held up, and its metrics say what is held.
    d.ok(&["volume", "list"]);
    let held = metric(&d, "blockd_nbd_memory_bytes ");
    assert!(
        held > f64::from(32u32 << 20) && held <= f64::from(64u32 << 20),
        "blockd_nbd_memory_bytes {held} with the limit reached"
    );
    // A client that writes meanwhile and then disconnects (libnbd sends
    // NBD_CMD_DISC and closes its sending side) has every write served
    // once memory frees.
    let mut disc = common::nbdsh_command()
        .args(["-u", &d.uri("vol1"), "-c"])
        .arg(
            "for i in range(16): h.aio_pwrite(b'\\x5a' * 4096, (48 << 20) + i * 4096)\n\
             h.shutdown()",
        )
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // A client that asks meanwhile waits; one that gives up while it
    // waits does not keep its connection.
    // (The writer above waits too, its connection open: 7.)
    let open = || metric(&d, "blockd_nbd_connections{volume=\"vol1\"} ");
    assert_eq!(open(), 7.0);
    let mut quitter = Raw::connect(&d, 3);
    quitter.go("vol1");
    quitter.request(0, 0, 1, 0, 4096, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(open(), 8.0);
    drop(quitter);
    let gone = Instant::now();
    while open() > 7.0 {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "a client that gave up while it waited kept its connection"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(greedy);
    let status = wait_timeout(&mut disc, Duration::from_secs(30)).expect("nbdsh hung");
    assert!(status.success());
    qemu_io(&d.uri("vol1"), &["read -P 0x5a 48M 64K"]);
    // The memory they held comes back: a READ of 32 MiB is served, then
    // two of 31 MiB at once, which need all of it but 2 MiB.
    served_within_20s(
        &d.uri("vol1"),
        "read -P 0x77 0 32M",
        "no client served after the greedy ones left",
    );
    let out = std::process::Command::new("timeout")
        .args(["60", "qemu-io", "-f", "raw"])
        .args([
            "-c",
            "aio_read -P 0x77 0 31M",
            "-c",
            "aio_read -P 0x77 32M 31M",
        ])
        .args(["-c", "aio_flush", &d.uri("vol1")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "two 31 MiB READs at once: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_data_intact(&d);
    assert_eq!(
        metric(&d, "blockd_nbd_memory_bytes "),
        0.0,
        "memory still held with no request"
    );
}

/// BLOCK_STATUS carries no payload, but its reply may hold thousands of
/// runs: clients that ask for it and never read the replies are bounded
/// by `--nbd-max-memory` as READs are.
#[test]
fn unread_block_status_replies_are_bounded_together() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let d = Blockd::start_with(None, &["--nbd-max-memory", "64M"]);
    d.create("vol1", "256M");
    // 4 KiB changed every 64 KiB: 8192 runs in the change map, of which
    // one reply holds the most it may, 4096 (32 KiB).
    let writes: Vec<String> = (0..4096)
        .map(|i| format!("write -P 0x77 {} 4K", i * 65536))
        .collect();
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for w in &writes {
        cmd.args(["-c", w]);
    }
    assert!(cmd.arg(d.uri("vol1")).output().unwrap().status.success());
    let mut clients: Vec<Raw> = (0..8)
        .map(|_| {
            let mut c = Raw::connect(&d, 3);
            c.option(8, &[]);
            assert_eq!(c.reply().1, REP_ACK);
            c.option(10, &meta_data("vol1", &["blockd:dirty"]));
            assert_eq!(c.reply().1, REP_META);
            assert_eq!(c.reply().1, REP_ACK);
            c.go("vol1");
            c
        })
        .collect();
    let base = rss(d.pid());
    let sent = flood(&mut clients, 6, 7, 256 << 20);
    let grown = rss(d.pid()).saturating_sub(base);
    // Unbounded, each connection queued 64 MiB of replies: 512 MiB.
    assert!(
        grown < 192 << 20,
        "{sent} unread BLOCK_STATUS replies on 8 connections grew the daemon by {} MiB",
        grown >> 20
    );
    drop(clients);
    served_within_20s(
        &d.uri("vol1"),
        "read -P 0x77 0 4K",
        "no client served after the block-status flood",
    );
}

/// The value of the metrics line that starts with `prefix`.
fn metric(d: &Blockd, prefix: &str) -> f64 {
    let mut s = UnixStream::connect(d.api_socket()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Anyone who can reach the TCP port can open connections and say
/// nothing: those still in their handshake hold at most half of
/// `--nbd-max-connections`, so the Unix socket's clients (and TCP clients
/// once slots free) are still served.
#[test]
fn silent_tcp_clients_cannot_take_every_slot() {
    use std::net::TcpStream;
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let [port] = common::objstores::free_ports::<1>();
    let addr = format!("127.0.0.1:{port}");
    let d = Blockd::start_with(None, &["--nbd-listen", &addr, "--nbd-max-connections", "4"]);
    d.create("vol1", "8M");
    qemu_io(&d.uri("vol1"), &["write -P 0x5a 0 1M", "flush"]);
    // Two silent connections: each gets its greeting and holds a slot.
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).unwrap();
            assert_eq!(&greeting[..8], b"NBDMAGIC");
            s
        })
        .collect();
    // More are closed before their greeting.
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "a third TCP connection in its handshake was served"
        );
    }
    assert!(
        d.log().contains("NBD TCP connection refused"),
        "{}",
        d.log()
    );
    // The Unix socket's clients still have the other two slots, at once.
    let outs = at_once(2, |_| {
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x5a 0 1M", &d.uri("vol1")])
            .output()
            .unwrap()
    });
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Once the silent ones go, a TCP client is served again.
    drop(silent);
    served_within_20s(
        &format!("nbd://{addr}/vol1"),
        "read -P 0x5a 0 1M",
        "no TCP client served after the silent ones left",
    );
}

/// Runs the qemu-io `command` on `uri` until it succeeds, for at most
/// 20 s (a freed slot is seen once the daemon notices its connection
/// went); fails with `what` and qemu-io's last error past that.
fn served_within_20s(uri: &str, command: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", command, uri])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
