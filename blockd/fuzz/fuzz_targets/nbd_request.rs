//! Fuzzes the NBD transmission-phase codec: request header parsing, request
//! checking and the replies built from the outcome.
//!
//! Input layout:
//! ```text
//! byte 0        bit 0: 1 = extended (32-byte) headers, 0 = compact (28-byte)
//! bytes 1..     handed to parse_request as they are (a short buffer is fine)
//! after the header, all optional:
//!   u64 BE      export size  } an extra ExportLimits variant chosen by the
//!   u8          limit flags  } fuzzer (bit 0 read_only, 1 structured,
//!                            }  2 has_meta_context, 3 extended)
//!   rest        pairs of u16 BE (gap, length): holes for the READ reply,
//!               and extents for the BLOCK_STATUS reply
//! ```
//!
//! Besides "never panics", it checks what the code promises: a parsed header
//! re-encodes to the same bytes, an accepted request is one the spec allows,
//! each error is one the spec names, and every reply is framed correctly
//! (a READ reply with holes reassembles to exactly the data read).
#![no_main]

use blockd::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

/// Largest READ reply the harness builds (keeps executions fast).
const MAX_FUZZ_READ: u64 = 1 << 14;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let extended = mode & 1 != 0;
    let need = request_len(extended);
    assert_eq!(need, if extended { 32 } else { 28 });
    let style = if extended {
        ReplyStyle::Extended
    } else {
        ReplyStyle::Simple
    };
    assert_eq!(style.chunk_header_len(), if extended { 32 } else { 16 });

    let parsed = parse_request(rest, extended);
    let req = match parsed {
        Err(FrameError::Short { len }) => {
            assert!(rest.len() < need, "Short for a {}-byte buffer", rest.len());
            assert_eq!(len, rest.len());
            return;
        }
        Err(FrameError::BadMagic { magic }) => {
            assert!(rest.len() >= need);
            assert_eq!(magic, be32(rest, 0));
            let want = if extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            };
            assert_ne!(magic, want, "right magic reported as bad");
            return;
        }
        // FrameError is non_exhaustive; a new kind of error is not a crash.
        Err(_) => return,
        Ok(req) => req,
    };
    assert!(rest.len() >= need);
    assert_eq!(encode(&req, extended), &rest[..need], "re-encoding differs");

    // Only WRITE (and, with extended headers, PAYLOAD_LEN) carries a payload.
    let payload = req.payload_len(extended);
    if req.command == Command::Write
        || (extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0)
    {
        assert_eq!(payload, req.length);
    } else {
        assert_eq!(payload, 0);
    }
    // The same header with PAYLOAD_LEN set, under extended headers: every
    // command then carries `length` bytes (the server drains and refuses
    // them for anything but WRITE).
    let with_len = Request {
        flags: req.flags | CMD_FLAG_PAYLOAD_LEN,
        ..req
    };
    assert_eq!(with_len.payload_len(true), req.length);

    let tail = &rest[need..];
    let mut limits = vec![
        ExportLimits {
            size: 0,
            read_only: false,
            structured: extended,
            has_meta_context: false,
            extended,
        },
        ExportLimits {
            size: 1 << 20,
            read_only: false,
            structured: extended,
            has_meta_context: false,
            extended,
        },
        ExportLimits {
            size: 1 << 30,
            read_only: true,
            structured: true,
            has_meta_context: true,
            extended,
        },
        ExportLimits {
            size: u64::MAX,
            read_only: false,
            structured: true,
            has_meta_context: true,
            extended,
        },
    ];
    let mut spec: &[u8] = &[];
    if tail.len() >= 9 {
        let f = tail[8];
        limits.push(ExportLimits {
            size: be64(tail, 0),
            read_only: f & 1 != 0,
            structured: f & 2 != 0,
            has_meta_context: f & 4 != 0,
            extended: f & 8 != 0,
        });
        spec = &tail[9..];
    }
    for lim in &limits {
        check(&req, lim, spec);
    }
}

/// The header bytes `req` was parsed from.
fn encode(req: &Request, extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&req.flags.to_be_bytes());
    let kind: u16 = match req.command {
        Command::Read => 0,
        Command::Write => 1,
        Command::Disc => 2,
        Command::Flush => 3,
        Command::Trim => 4,
        Command::Cache => 5,
        Command::WriteZeroes => 6,
        Command::BlockStatus => 7,
        Command::Unknown(t) => {
            assert!(t > 7, "known command type {t} parsed as Unknown");
            t
        }
    };
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&req.cookie.to_be_bytes());
    b.extend_from_slice(&req.offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&req.length.to_be_bytes());
    } else {
        let l = u32::try_from(req.length).expect("compact length above u32");
        b.extend_from_slice(&l.to_be_bytes());
    }
    b
}

fn style_of(lim: &ExportLimits) -> ReplyStyle {
    if lim.extended {
        ReplyStyle::Extended
    } else if lim.structured {
        ReplyStyle::Structured
    } else {
        ReplyStyle::Simple
    }
}

fn check(req: &Request, lim: &ExportLimits, spec: &[u8]) {
    use Command::*;
    let cmd = req.command;
    let res = check_request(req, lim);
    let in_range = matches!(req.offset.checked_add(req.length), Some(e) if e <= lim.size);
    let style = style_of(lim);
    match res {
        Ok(()) => {
            assert!(!matches!(cmd, Unknown(_)), "unknown command accepted");
            let known = CMD_FLAG_FUA
                | CMD_FLAG_NO_HOLE
                | CMD_FLAG_DF
                | CMD_FLAG_REQ_ONE
                | CMD_FLAG_FAST_ZERO
                | CMD_FLAG_PAYLOAD_LEN;
            assert_eq!(req.flags & !known, 0, "unknown flags accepted");
            if req.flags & CMD_FLAG_DF != 0 {
                assert!(cmd == Read && lim.structured, "DF accepted on {cmd}");
            }
            if req.flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 {
                assert_eq!(cmd, WriteZeroes);
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                assert_eq!(cmd, BlockStatus);
            }
            if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
                assert!(cmd == Write && lim.extended, "PAYLOAD_LEN accepted");
            }
            if matches!(cmd, Read | Write | WriteZeroes | Trim | Cache | BlockStatus) {
                assert!(in_range, "{cmd} beyond the end accepted: {req:?} {lim:?}");
            }
            if matches!(cmd, Read | Write) {
                assert!(req.length <= u64::from(MAX_PAYLOAD));
            }
            if matches!(cmd, Write | WriteZeroes | Trim) {
                assert!(!lim.read_only, "{cmd} accepted on a read-only export");
            }
            if cmd == BlockStatus {
                assert!(lim.has_meta_context && req.length > 0);
            }
            if cmd == Flush {
                assert!(req.offset == 0 && req.length == 0);
            }
            match cmd {
                Read if req.length > 0 && req.length <= MAX_FUZZ_READ => {
                    read_reply(req, style, spec);
                    if style != ReplyStyle::Simple {
                        // The whole range reads as zeros.
                        let mut out = Vec::new();
                        hole_reply(&mut out, style, req.cookie, req.offset, req.length);
                        let chunks = chunks(&out, style);
                        assert_eq!(chunks.len(), 1);
                        let c = &chunks[0];
                        assert_eq!((c.kind, c.cookie), (REPLY_TYPE_OFFSET_HOLE, req.cookie));
                        assert_eq!(c.payload.len(), 12);
                        assert_eq!(be64(c.payload, 0), req.offset);
                        assert_eq!(u64::from(be32(c.payload, 8)), req.length);
                    }
                }
                BlockStatus if style != ReplyStyle::Simple => block_status(req, style, spec),
                _ => {
                    let mut out = Vec::new();
                    ok_reply(&mut out, style, req.cookie, req.offset);
                    if style == ReplyStyle::Extended {
                        let chunks = chunks(&out, style);
                        assert_eq!(chunks.len(), 1);
                        let c = &chunks[0];
                        assert_eq!((c.flags, c.kind), (REPLY_FLAG_DONE, REPLY_TYPE_NONE));
                        assert_eq!(c.cookie, req.cookie);
                        assert!(c.payload.is_empty());
                    } else {
                        assert_simple(&out, req.cookie, 0);
                    }
                }
            }
        }
        Err(errno) => {
            match errno {
                Errno::Perm => assert!(lim.read_only && matches!(cmd, Write | WriteZeroes | Trim)),
                Errno::NoSpc => assert!(matches!(cmd, Write | WriteZeroes) && !in_range),
                Errno::Overflow => {
                    assert!(matches!(cmd, Read | Write) && req.length > u64::from(MAX_PAYLOAD))
                }
                Errno::Inval => {}
                other => panic!("check_request returned {other:?} for {req:?}"),
            }
            let msg = "invalid request";
            let mut out = Vec::new();
            error_reply(&mut out, style, req.cookie, req.offset, errno, msg);
            if style == ReplyStyle::Simple {
                assert_simple(&out, req.cookie, errno.code());
            } else {
                let chunks = chunks(&out, style);
                assert_eq!(chunks.len(), 1);
                let c = &chunks[0];
                assert_eq!((c.flags, c.kind), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
                assert_eq!(c.cookie, req.cookie);
                assert_eq!(c.payload.len(), 6 + msg.len());
                assert_eq!(be32(c.payload, 0), errno.code());
                assert_eq!(usize::from(be16(c.payload, 4)), msg.len());
                assert_eq!(&c.payload[6..], msg.as_bytes());
            }
        }
    }
}

fn assert_simple(out: &[u8], cookie: u64, error: u32) {
    assert_eq!(out.len(), 16);
    assert_eq!(be32(out, 0), SIMPLE_REPLY_MAGIC);
    assert_eq!(be32(out, 4), error);
    assert_eq!(be64(out, 8), cookie);
}

struct Chunk<'a> {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: &'a [u8],
}

/// Splits a structured or extended reply into chunks, checking the framing:
/// magic, declared length within the buffer, one cookie, DONE only on the
/// last chunk.
fn chunks(mut b: &[u8], style: ReplyStyle) -> Vec<Chunk<'_>> {
    let hl = style.chunk_header_len();
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= hl, "truncated chunk header");
        let (magic, len) = match style {
            ReplyStyle::Structured => (STRUCTURED_REPLY_MAGIC, u64::from(be32(b, 16))),
            ReplyStyle::Extended => (EXTENDED_REPLY_MAGIC, be64(b, 24)),
            ReplyStyle::Simple => unreachable!(),
        };
        assert_eq!(be32(b, 0), magic);
        assert!(len <= (b.len() - hl) as u64, "chunk length beyond the reply");
        let end = hl + len as usize;
        v.push(Chunk {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            payload: &b[hl..end],
        });
        b = &b[end..];
    }
    assert!(!v.is_empty());
    let last = v.len() - 1;
    for (i, c) in v.iter().enumerate() {
        assert_eq!(c.flags & REPLY_FLAG_DONE != 0, i == last, "DONE flag misplaced");
        assert_eq!(c.cookie, v[0].cookie);
    }
    v
}

fn pairs(spec: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    spec.chunks_exact(4)
        .map(|p| (u64::from(be16(p, 0)), u64::from(be16(p, 2))))
}

/// Builds a READ reply with fuzzer-chosen holes (sorted, disjoint, non-empty
/// and inside the data, as `finish_read_reply` documents) and checks it
/// reassembles to the data.
fn read_reply(req: &Request, style: ReplyStyle, spec: &[u8]) {
    let len = req.length;
    let mut holes = Vec::new();
    let mut pos = 0u64;
    for (gap, hl) in pairs(spec) {
        let start = pos + gap % (len + 1);
        if start >= len {
            break;
        }
        let hlen = 1 + hl % (len - start);
        holes.push((start, hlen));
        pos = start + hlen;
    }
    // Data bytes are never zero, hole bytes always are.
    let mut expect: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    for &(s, l) in &holes {
        expect[s as usize..(s + l) as usize].fill(0);
    }
    let hdr = read_reply_header_len(style);
    let mut buf = vec![0u8; hdr];
    buf.extend_from_slice(&expect);
    let df = req.flags & CMD_FLAG_DF != 0;
    let reply = finish_read_reply(buf, style, req.cookie, req.offset, &holes, df);
    if style == ReplyStyle::Simple {
        assert_simple(&reply[..16], req.cookie, 0);
        assert_eq!(&reply[16..], &expect[..]);
        return;
    }
    let chunks = chunks(&reply, style);
    if df || holes.is_empty() {
        assert_eq!(chunks.len(), 1, "unfragmented reply split");
    }
    let mut covered = vec![false; len as usize];
    for c in &chunks {
        assert_eq!(c.cookie, req.cookie);
        assert!(c.payload.len() >= 8);
        let at = be64(c.payload, 0);
        assert!(at >= req.offset, "chunk before the request");
        let rel = (at - req.offset) as usize;
        let n = match c.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let d = &c.payload[8..];
                assert!(!d.is_empty(), "empty data chunk");
                assert!(rel + d.len() <= expect.len(), "data past the request");
                assert_eq!(d, &expect[rel..rel + d.len()], "wrong data at {rel}");
                d.len()
            }
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12);
                let n = be32(c.payload, 8) as usize;
                assert!(n > 0, "empty hole chunk");
                assert!(rel + n <= expect.len(), "hole past the request");
                assert!(expect[rel..rel + n].iter().all(|&b| b == 0), "hole over data");
                n
            }
            k => panic!("unexpected chunk type {k} in a READ reply"),
        };
        for c in &mut covered[rel..rel + n] {
            assert!(!*c, "byte sent twice");
            *c = true;
        }
    }
    assert!(covered.iter().all(|&c| c), "bytes missing from the reply");
}

fn block_status(req: &Request, style: ReplyStyle, spec: &[u8]) {
    let extents: Vec<Extent> = pairs(spec)
        .take(64)
        .map(|(l, f)| Extent {
            length: l + 1,
            flags: (f as u32) & (STATE_HOLE | STATE_ZERO),
        })
        .collect();
    // A chunk that is not the last (one per context) has no DONE flag.
    let mut more = Vec::new();
    let one = [Extent {
        length: req.length,
        flags: 0,
    }];
    block_status_chunk(&mut more, style, req.cookie, req.offset, 2, &one, false);
    assert_eq!(be16(&more, 4), 0, "DONE on a chunk that is not the last");
    let mut out = Vec::new();
    block_status_chunk(&mut out, style, req.cookie, req.offset, 1, &extents, true);
    more.extend_from_slice(&out);
    let chunks = chunks(&more, style);
    assert_eq!(chunks.len(), 2);
    assert_eq!(be32(chunks[0].payload, 0), 2);
    let c = &chunks[1];
    let (kind, head, per) = if style == ReplyStyle::Extended {
        (REPLY_TYPE_BLOCK_STATUS_EXT, 8, 16)
    } else {
        (REPLY_TYPE_BLOCK_STATUS, 4, 8)
    };
    assert_eq!(c.kind, kind);
    assert_eq!(c.payload.len(), head + per * extents.len());
    assert_eq!(be32(c.payload, 0), 1);
    for (i, e) in extents.iter().enumerate() {
        let at = head + per * i;
        if style == ReplyStyle::Extended {
            assert_eq!(be64(c.payload, at), e.length);
            assert_eq!(be64(c.payload, at + 8), u64::from(e.flags));
        } else {
            assert_eq!(u64::from(be32(c.payload, at)), e.length);
            assert_eq!(be32(c.payload, at + 4), e.flags);
        }
    }
}
