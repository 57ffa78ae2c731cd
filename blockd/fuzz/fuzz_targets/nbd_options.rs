//! Fuzzes the fixed-newstyle option negotiation (`Negotiation`) against a
//! small in-memory set of two exports.
//!
//! Input layout (all big-endian):
//! ```text
//! u8            TLS mode of the server: 0 none, 1 offered, 2 required
//!               (taken modulo 3)
//! u32           client handshake flags (unknown bits must be refused)
//! then, repeated until the input ends:
//!   u32         option number
//!   u16         bit 15: the server starts shutting down before this option
//!               (it stays shut down for the rest of the input);
//!               bits 0-14: data length (cut to what is left of the input)
//!   data
//! ```
//! The run stops at the first option that ends the negotiation (Close or
//! Transmit), as the server does. An acknowledged STARTTLS goes on with the
//! negotiation the server continues with over TLS, which must have
//! forgotten everything agreed before.
//!
//! Every reply is checked: except for a successful EXPORT_NAME, the bytes
//! are a sequence of option replies, each with the reply magic, the option
//! echoed, a known reply type and a declared length that fits, ending in
//! exactly one final reply (ACK or error). The payloads of SERVER, INFO and
//! META_CONTEXT replies are decoded, and the Transmission entered is
//! compared with a model of what the client negotiated.
#![no_main]

use blockd::nbd::negotiate::*;
use blockd::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

struct TwoExports;

fn vol1() -> ExportInfo {
    ExportInfo {
        name: "vol1".into(),
        description: "first volume".into(),
        size: 1 << 30,
        read_only: false,
        preferred_block: 4096,
    }
}

fn archive() -> ExportInfo {
    ExportInfo {
        name: "archive".into(),
        description: String::new(),
        size: (1 << 40) + 512,
        read_only: true,
        preferred_block: 1 << 20,
    }
}

impl Exports for TwoExports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "vol1" => Some(vol1()),
            "archive" => Some(archive()),
            _ => None,
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        [vol1(), archive()]
            .into_iter()
            .map(|e| (e.name, e.description))
            .collect()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// What the client has negotiated so far, tracked from the replies.
#[derive(Default)]
struct Model {
    /// TLS mode: 0 none, 1 offered, 2 required; 3 once TLS is up.
    tls: u8,
    /// The client sent FIXED_NEWSTYLE.
    fixed: bool,
    structured: bool,
    extended: bool,
    /// Export name and context ids of the last SET_META_CONTEXT that was
    /// acknowledged (cleared by one that was refused).
    meta: Option<(String, Vec<u32>)>,
}

impl Model {
    fn style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }
}

const KNOWN_OPTIONS: &[u32] = &[
    OPT_EXPORT_NAME,
    OPT_ABORT,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_INFO,
    OPT_GO,
    OPT_STRUCTURED_REPLY,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_EXTENDED_HEADERS,
];

const ERRORS: &[u32] = &[
    REP_ERR_UNSUP,
    REP_ERR_POLICY,
    REP_ERR_INVALID,
    REP_ERR_PLATFORM,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_SHUTDOWN,
    REP_ERR_TOO_BIG,
    REP_ERR_EXT_HEADER_REQD,
];

fn run(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let g = greeting();
    assert_eq!(be64(&g, 0), NBDMAGIC);
    assert_eq!(be64(&g, 8), IHAVEOPT);
    assert_eq!(be16(&g, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mode = data[0] % 3;
    let data = &data[1..];
    let flags = be32(data, 0);
    let known = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
    let mut nego = match Negotiation::new(flags) {
        Ok(n) => {
            assert_eq!(flags & !known, 0, "unknown client flags accepted");
            n.with_tls([Tls::Unavailable, Tls::Offered, Tls::Required][usize::from(mode)])
        }
        Err(e) => {
            assert_ne!(flags & !known, 0, "known client flags refused");
            assert_eq!(e.flags, flags);
            return;
        }
    };
    let no_zeroes = flags & CLIENT_NO_ZEROES != 0;
    let mut model = Model {
        tls: mode,
        fixed: flags & CLIENT_FIXED_NEWSTYLE != 0,
        ..Model::default()
    };
    let mut shutting_down = false;
    let mut rest = &data[4..];
    while rest.len() >= 6 {
        let option = be32(rest, 0);
        let raw = be16(rest, 4);
        shutting_down |= raw & 0x8000 != 0;
        let len = usize::from(raw & 0x7fff).min(rest.len() - 6);
        let payload = &rest[6..6 + len];
        rest = &rest[6 + len..];

        let (out, next) = nego.option(option, payload, &TwoExports, shutting_down);
        if !shutting_down && model.tls == 2 && option != OPT_STARTTLS && option != OPT_ABORT {
            tls_required(option, &out, &next, model.fixed);
            if next == Next::Close {
                return;
            }
            continue;
        }
        if next == Next::StartTls {
            assert!(!shutting_down && payload.is_empty() && model.fixed);
            assert!(matches!(model.tls, 1 | 2), "STARTTLS accepted in mode {}", model.tls);
            assert_eq!(out.len(), 20, "STARTTLS answered with more than an ACK");
            assert_eq!(be32(&out, 12), REP_ACK);
            nego = nego.after_tls();
            model = Model {
                tls: 3,
                fixed: model.fixed,
                ..Model::default()
            };
            continue;
        }
        let go_on = if option == OPT_EXPORT_NAME {
            export_name(payload, &out, &next, &model, no_zeroes, shutting_down)
        } else {
            other_option(option, payload, &out, &next, &mut model, shutting_down)
        };
        if !go_on {
            return;
        }
    }
}

/// Before TLS, with TLS required: one TLS_REQD reply, or the end of the
/// connection for EXPORT_NAME and clients without fixed newstyle.
fn tls_required(option: u32, out: &[u8], next: &Next, fixed: bool) {
    if option == OPT_EXPORT_NAME || !fixed {
        assert!(out.is_empty());
        assert_eq!(*next, Next::Close, "option {option} served without TLS");
        return;
    }
    assert_eq!(*next, Next::Continue, "option {option} served without TLS");
    assert!(out.len() >= 20);
    assert_eq!(be32(out, 12), REP_ERR_TLS_REQD, "option {option} served without TLS");
    assert_eq!(be32(out, 16) as usize, out.len() - 20, "more than one reply");
}

/// The export name at the start of INFO/GO/META_CONTEXT data, if well formed.
fn leading_name(data: &[u8]) -> Option<&str> {
    let n = usize::try_from(be32(data.get(..4)?, 0)).ok()?;
    std::str::from_utf8(data.get(4..4 + n)?).ok()
}

fn export_name(
    payload: &[u8],
    out: &[u8],
    next: &Next,
    model: &Model,
    no_zeroes: bool,
    shutting_down: bool,
) -> bool {
    let wanted = std::str::from_utf8(payload)
        .ok()
        .and_then(|n| TwoExports.lookup(n));
    match next {
        Next::Close => {
            assert!(out.is_empty(), "EXPORT_NAME failure has no reply");
            assert!(
                shutting_down || wanted.is_none() || model.extended,
                "EXPORT_NAME of a known export closed"
            );
        }
        Next::Transmit(t) => {
            assert!(!shutting_down && !model.extended);
            let export = wanted.expect("EXPORT_NAME entered an unknown export");
            assert_eq!(t.export, export);
            assert_eq!(out.len(), 10 + if no_zeroes { 0 } else { 124 });
            assert_eq!(be64(out, 0), export.size);
            assert_eq!(be16(out, 8), t.flags);
            assert!(out[10..].iter().all(|&b| b == 0));
            transmission(t, model);
        }
        Next::Continue => panic!("EXPORT_NAME continued the negotiation"),
        Next::StartTls => panic!("EXPORT_NAME started TLS"),
    }
    false
}

fn transmission(t: &Transmission, model: &Model) {
    assert_eq!(t.style, model.style(), "reply style differs from negotiated");
    assert_ne!(t.flags & TF_HAS_FLAGS, 0);
    assert_eq!(t.flags & TF_READ_ONLY != 0, t.export.read_only);
    assert_eq!(t.flags & TF_SEND_DF != 0, model.structured);
    if t.export.read_only {
        let writes = TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        assert_eq!(t.flags & writes, 0, "write features on a read-only export");
    }
    match &model.meta {
        Some((name, ids)) if *name == t.export.name => {
            assert!(t.contexts.iter().all(|c| ids.contains(c)), "unselected context");
        }
        _ => assert!(t.contexts.is_empty(), "contexts without a matching SET"),
    }
}

/// Checks the replies to any option but EXPORT_NAME; returns whether the
/// negotiation goes on.
fn other_option(
    option: u32,
    payload: &[u8],
    out: &[u8],
    next: &Next,
    model: &mut Model,
    shutting_down: bool,
) -> bool {
    // Split into replies, checking the framing.
    let mut replies: Vec<(u32, &[u8])> = Vec::new();
    let mut b = out;
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated option reply header");
        assert_eq!(be64(b, 0), REPLY_MAGIC, "bad option reply magic");
        assert_eq!(be32(b, 8), option, "option not echoed");
        let kind = be32(b, 12);
        let len = be32(b, 16) as usize;
        assert!(len <= b.len() - 20, "declared length beyond the reply");
        replies.push((kind, &b[20..20 + len]));
        b = &b[20 + len..];
    }
    let Some(&(last, _)) = replies.last() else {
        panic!("option {option} got no reply");
    };
    let is_err = |k: u32| ERRORS.contains(&k);
    assert!(last == REP_ACK || is_err(last), "no final reply: {last:#x}");
    for &(k, _) in &replies[..replies.len() - 1] {
        assert!(
            matches!(k, REP_SERVER | REP_INFO | REP_META_CONTEXT),
            "reply type {k:#x} before the final one"
        );
    }
    for &(k, d) in &replies {
        assert!(
            k != REP_ERR_TLS_REQD || model.tls == 2,
            "TLS_REQD from a server that does not require TLS (mode {})",
            model.tls
        );
        if is_err(k) {
            // Error messages are for humans: UTF-8 text.
            assert!(std::str::from_utf8(d).is_ok());
        }
    }
    let acked = last == REP_ACK;

    if shutting_down && option != OPT_ABORT {
        assert_eq!(replies.len(), 1);
        assert_eq!(last, REP_ERR_SHUTDOWN);
        assert_eq!(*next, Next::Continue);
        return true;
    }
    if !KNOWN_OPTIONS.contains(&option) {
        assert_eq!(replies.len(), 1);
        assert_eq!(last, REP_ERR_UNSUP);
    }

    match next {
        Next::Close => {
            assert_eq!(option, OPT_ABORT, "option {option} closed the connection");
            assert!(acked);
        }
        Next::Transmit(_) => assert!(option == OPT_GO && acked, "option {option} transmits"),
        Next::StartTls => unreachable!("handled by run"),
        Next::Continue => {
            assert_ne!(option, OPT_ABORT);
            assert!(!(option == OPT_GO && acked), "acknowledged GO did not transmit");
        }
    }

    match option {
        OPT_LIST => {
            if acked {
                assert!(payload.is_empty());
                let mut names = Vec::new();
                for &(k, d) in &replies[..replies.len() - 1] {
                    assert_eq!(k, REP_SERVER);
                    assert!(d.len() >= 4);
                    let n = be32(d, 0) as usize;
                    assert!(n <= d.len() - 4, "name length beyond SERVER reply");
                    names.push(std::str::from_utf8(&d[4..4 + n]).unwrap().to_owned());
                }
                assert_eq!(names, ["vol1", "archive"]);
            }
        }
        OPT_STARTTLS => assert!(!acked, "STARTTLS acknowledged without moving to TLS"),
        OPT_STRUCTURED_REPLY => {
            if model.extended {
                assert!(!acked, "STRUCTURED_REPLY acknowledged after EXTENDED_HEADERS");
            }
            if acked {
                assert!(payload.is_empty());
                model.structured = true;
            }
        }
        OPT_EXTENDED_HEADERS => {
            if acked {
                assert!(payload.is_empty());
                model.extended = true;
                model.structured = true;
            }
        }
        OPT_INFO | OPT_GO => {
            if acked {
                let name = leading_name(payload).expect("malformed INFO/GO acknowledged");
                let export = TwoExports.lookup(name).expect("unknown export acknowledged");
                info_replies(&replies[..replies.len() - 1], &export, next);
            } else if let Some(name) = leading_name(payload) {
                if last == REP_ERR_UNKNOWN {
                    assert!(TwoExports.lookup(name).is_none());
                }
            }
            if let Next::Transmit(t) = next {
                assert_eq!(Some(&t.export), TwoExports.lookup(leading_name(payload).unwrap()).as_ref());
                transmission(t, model);
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let set = option == OPT_SET_META_CONTEXT;
            if !model.structured {
                assert!(!acked, "metadata contexts before structured replies");
            }
            let mut ids = Vec::new();
            for &(k, d) in &replies[..replies.len() - 1] {
                assert_eq!(k, REP_META_CONTEXT);
                assert!(d.len() >= 4);
                let id = be32(d, 0);
                let name = std::str::from_utf8(&d[4..]).expect("context name not UTF-8");
                let offered = META_CONTEXTS.iter().find(|c| c.0 == name);
                let &(_, real) = offered.expect("unknown context named");
                if set {
                    assert_eq!(id, real, "SET reply with a wrong context id");
                    assert!(!ids.contains(&id), "context selected twice");
                    ids.push(id);
                }
            }
            if acked {
                let name = leading_name(payload).expect("malformed META_CONTEXT acknowledged");
                assert!(TwoExports.lookup(name).is_some());
                if set {
                    model.meta = Some((name.to_owned(), ids));
                }
            } else if set {
                model.meta = None;
            }
        }
        _ => {}
    }
    *next == Next::Continue
}

/// The INFO replies before the ACK of an INFO or GO.
fn info_replies(replies: &[(u32, &[u8])], export: &ExportInfo, next: &Next) {
    let mut saw_export = 0;
    let mut saw_block = 0;
    for &(k, d) in replies {
        assert_eq!(k, REP_INFO);
        assert!(d.len() >= 2);
        match be16(d, 0) {
            INFO_EXPORT => {
                saw_export += 1;
                assert_eq!(d.len(), 12);
                assert_eq!(be64(d, 2), export.size);
                let flags = be16(d, 10);
                assert_eq!(flags & TF_READ_ONLY != 0, export.read_only);
                if let Next::Transmit(t) = next {
                    assert_eq!(flags, t.flags, "INFO_EXPORT flags differ from those used");
                }
            }
            INFO_NAME => assert_eq!(&d[2..], export.name.as_bytes()),
            INFO_DESCRIPTION => assert_eq!(&d[2..], export.description.as_bytes()),
            INFO_BLOCK_SIZE => {
                saw_block += 1;
                assert_eq!(d.len(), 14);
                let (min, pref, max) = (be32(d, 2), be32(d, 6), be32(d, 10));
                assert!(min.is_power_of_two() && pref.is_power_of_two());
                assert!(min <= pref && pref <= max, "block sizes {min} {pref} {max}");
            }
            t => panic!("unknown INFO type {t}"),
        }
    }
    assert_eq!(saw_export, 1, "INFO_EXPORT must be sent exactly once");
    assert!(saw_block <= 1);
}
