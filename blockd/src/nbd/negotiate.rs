//! Option haggling: the fixed-newstyle negotiation as a pure state machine.
//!
//! The connection reads one option (header and data) and hands it to
//! [`Negotiation::option`], which returns the bytes to send back and what to
//! do next. No I/O happens here, so the fuzzer drives every branch.
//!
//! Rules followed (doc/proto.md): unknown client flags end the connection;
//! unknown options get `ERR_UNSUP` and negotiation continues; INFO/GO for an
//! unknown export get `ERR_UNKNOWN`; EXPORT_NAME for an unknown export closes
//! the connection (the option has no error reply); SET_META_CONTEXT before
//! STRUCTURED_REPLY gets `ERR_INVALID`; the contexts selected by
//! SET_META_CONTEXT apply only if GO names the same export; during shutdown
//! every option but ABORT gets `ERR_SHUTDOWN`.
//!
//! TLS (doc/proto.md, "TLS support"): a server without certificates is in
//! NOTLS mode (STARTTLS gets `ERR_POLICY`); with certificates it is in
//! FORCEDTLS mode when TLS is required (every option but STARTTLS and
//! ABORT gets `ERR_TLS_REQD`, EXPORT_NAME closes) or offers TLS without
//! requiring it. STARTTLS is acknowledged and the caller upgrades the
//! connection ([`Next::StartTls`]); the negotiation then starts over from
//! [`Negotiation::after_tls`], forgetting everything agreed in plain text
//! so nothing a man in the middle injected before the upgrade survives it.

use super::proto::*;

/// What an export looks like to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Human description.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Preferred block size (the volume's extent size).
    pub preferred_block: u32,
}

impl ExportInfo {
    /// Transmission flags advertised for this export: exactly what the
    /// server implements.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        if self.read_only {
            flags |= TF_READ_ONLY;
        } else {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if structured {
            flags |= TF_SEND_DF;
        }
        flags
    }
}

/// The exports a negotiation can see.
pub trait Exports {
    /// Looks up one export by name.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for NBD_OPT_LIST: `(name, description)`.
    fn list(&self) -> Vec<(String, String)>;
    /// Why an export of that name exists but is not served, if it is so.
    fn refused(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Metadata context id of `base:allocation`.
pub const CONTEXT_BASE_ALLOCATION: u32 = 1;
/// Context id of `blockd:dirty`: extents changed since the last backup
/// (bit 0 set = changed).
pub const CONTEXT_BLOCKD_DIRTY: u32 = 2;
/// Context id of `qemu:dirty-bitmap:blockd`: the same map under QEMU's
/// name and meaning (bit 0 = dirty), so libnbd-based backup tools that
/// read QEMU dirty bitmaps work unchanged.
pub const CONTEXT_QEMU_DIRTY: u32 = 3;

/// Every metadata context this server offers, with its id.
pub const META_CONTEXTS: &[(&str, u32)] = &[
    ("base:allocation", CONTEXT_BASE_ALLOCATION),
    ("blockd:dirty", CONTEXT_BLOCKD_DIRTY),
    ("qemu:dirty-bitmap:blockd", CONTEXT_QEMU_DIRTY),
];

/// Where negotiation goes after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Continue,
    /// Close the connection (after sending the replies, if any).
    Close,
    /// Enter transmission on this export.
    Transmit(Transmission),
    /// STARTTLS was acknowledged: run the TLS handshake, then go on with
    /// [`Negotiation::after_tls`].
    StartTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tls {
    /// No certificates: STARTTLS is refused (NOTLS mode).
    #[default]
    Unavailable,
    /// STARTTLS is accepted, plain text too.
    Offered,
    /// Nothing but STARTTLS and ABORT until TLS is up (FORCEDTLS mode).
    Required,
    /// The connection runs over TLS.
    Active,
}

/// The settled parameters of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission {
    /// The export.
    pub export: ExportInfo,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Reply framing.
    pub style: ReplyStyle,
    /// Selected metadata context ids.
    pub contexts: Vec<u32>,
}

/// Why the handshake cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client sent unknown handshake flags {flags:#x}")]
pub struct ClientFlagsError {
    /// The flags received.
    pub flags: u32,
}

/// State of one connection's negotiation.
#[derive(Debug, Clone, Default)]
pub struct Negotiation {
    no_zeroes: bool,
    fixed: bool,
    tls: Tls,
    structured: bool,
    extended: bool,
    /// Export name and context ids chosen by the last SET_META_CONTEXT.
    meta: Option<(String, Vec<u32>)>,
}

/// The server greeting: magic, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Appends one option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error option reply with a message for humans.
pub fn option_error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    option_reply(out, option, kind, message.as_bytes());
}

/// A little reader over option data that never panics.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()?;
        if len > 4096 {
            return None;
        }
        std::str::from_utf8(self.take(len as usize)?).ok()
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl Negotiation {
    /// Starts a negotiation from the client's handshake flags.
    ///
    /// # Errors
    /// Unknown flags: the caller must drop the connection.
    pub fn new(client_flags: u32) -> Result<Self, ClientFlagsError> {
        if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(ClientFlagsError {
                flags: client_flags,
            });
        }
        Ok(Self {
            no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
            fixed: client_flags & CLIENT_FIXED_NEWSTYLE != 0,
            ..Self::default()
        })
    }

    /// Sets this connection's TLS mode (before the first option).
    #[must_use]
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// The negotiation that continues over TLS once STARTTLS succeeded:
    /// the client flags stay, every option agreed before is forgotten.
    #[must_use]
    pub fn after_tls(&self) -> Self {
        Self {
            no_zeroes: self.no_zeroes,
            fixed: self.fixed,
            tls: Tls::Active,
            ..Self::default()
        }
    }

    /// Handles one option and returns the reply bytes and what comes next.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        shutting_down: bool,
    ) -> (Vec<u8>, Next) {
        let mut out = Vec::new();
        if shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return (out, Next::Close);
            }
            option_error(
                &mut out,
                option,
                REP_ERR_SHUTDOWN,
                "server is shutting down",
            );
            return (out, Next::Continue);
        }
        if self.tls == Tls::Required && option != OPT_STARTTLS && option != OPT_ABORT {
            // Without fixed newstyle a client cannot ask for TLS at all,
            // and EXPORT_NAME has no error reply: both end here.
            if option == OPT_EXPORT_NAME || !self.fixed {
                return (out, Next::Close);
            }
            option_error(
                &mut out,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: connect with nbds:// (libnbd) or \
                 tls-creds (qemu) and the CA that signed its certificate",
            );
            return (out, Next::Continue);
        }
        let next = match option {
            OPT_EXPORT_NAME => return self.export_name(data, exports),
            OPT_ABORT => {
                option_reply(&mut out, option, REP_ACK, &[]);
                Next::Close
            }
            OPT_LIST => {
                if data.is_empty() {
                    for (name, description) in exports.list() {
                        let mut d = Vec::with_capacity(4 + name.len() + description.len());
                        d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        d.extend_from_slice(description.as_bytes());
                        option_reply(&mut out, option, REP_SERVER, &d);
                    }
                    option_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    option_error(&mut out, option, REP_ERR_INVALID, "LIST takes no data");
                }
                Next::Continue
            }
            OPT_STARTTLS => return self.starttls(data),
            OPT_INFO | OPT_GO => return self.info_or_go(option, data, exports),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else if self.extended {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    self.structured = true;
                    option_reply(&mut out, option, REP_ACK, &[]);
                }
                Next::Continue
            }
            OPT_EXTENDED_HEADERS => {
                if data.is_empty() {
                    self.extended = true;
                    self.structured = true;
                    option_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    );
                }
                Next::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, &mut out);
                Next::Continue
            }
            _ => {
                option_error(&mut out, option, REP_ERR_UNSUP, "option not supported");
                Next::Continue
            }
        };
        (out, next)
    }

    fn starttls(&mut self, data: &[u8]) -> (Vec<u8>, Next) {
        let mut out = Vec::new();
        let refusal = if !data.is_empty() {
            Some((REP_ERR_INVALID, "STARTTLS takes no data"))
        } else {
            match self.tls {
                Tls::Unavailable => Some((
                    REP_ERR_POLICY,
                    "TLS is not configured on this server (blockd --nbd-tls-certificates)",
                )),
                Tls::Active => Some((REP_ERR_INVALID, "TLS is already active")),
                Tls::Offered | Tls::Required if !self.fixed => {
                    Some((REP_ERR_POLICY, "TLS needs the fixed newstyle handshake"))
                }
                Tls::Offered | Tls::Required => None,
            }
        };
        if let Some((kind, message)) = refusal {
            option_error(&mut out, OPT_STARTTLS, kind, message);
            return (out, Next::Continue);
        }
        option_reply(&mut out, OPT_STARTTLS, REP_ACK, &[]);
        (out, Next::StartTls)
    }

    fn style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }

    fn transmission(&self, export: ExportInfo) -> Transmission {
        let contexts = match &self.meta {
            Some((name, ids)) if *name == export.name => ids.clone(),
            _ => Vec::new(),
        };
        Transmission {
            flags: export.transmission_flags(self.structured),
            style: self.style(),
            contexts,
            export,
        }
    }

    fn export_name(&mut self, data: &[u8], exports: &dyn Exports) -> (Vec<u8>, Next) {
        let mut out = Vec::new();
        // EXPORT_NAME has no error reply: an unknown export (or a client that
        // already chose extended headers, which forbids this option) is closed.
        let export = std::str::from_utf8(data)
            .ok()
            .filter(|_| !self.extended)
            .and_then(|name| exports.lookup(name));
        let Some(export) = export else {
            return (out, Next::Close);
        };
        let t = self.transmission(export);
        out.extend_from_slice(&t.export.size.to_be_bytes());
        out.extend_from_slice(&t.flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        (out, Next::Transmit(t))
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], exports: &dyn Exports) -> (Vec<u8>, Next) {
        let mut out = Vec::new();
        let mut cur = Cursor { data };
        let parsed = (|| {
            let name = cur.string()?;
            let n = cur.u16()?;
            let mut requests = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                requests.push(cur.u16()?);
            }
            cur.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            option_error(
                &mut out,
                option,
                REP_ERR_INVALID,
                "malformed INFO/GO request",
            );
            return (out, Next::Continue);
        };
        let Some(export) = exports.lookup(name) else {
            if let Some(why) = exports.refused(name) {
                option_error(&mut out, option, REP_ERR_POLICY, &why);
                return (out, Next::Continue);
            }
            option_error(
                &mut out,
                option,
                REP_ERR_UNKNOWN,
                &if name.contains('@') {
                    format!("no snapshot export named {name:?}: list them with `blockctl snapshot list`")
                } else {
                    format!("no export named {name:?}: list them with `blockctl volume list`")
                },
            );
            return (out, Next::Continue);
        };
        let t = self.transmission(export);
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&t.export.size.to_be_bytes());
        info.extend_from_slice(&t.flags.to_be_bytes());
        option_reply(&mut out, option, REP_INFO, &info);
        if requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(t.export.name.as_bytes());
            option_reply(&mut out, option, REP_INFO, &d);
        }
        if requests.contains(&INFO_DESCRIPTION) && !t.export.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(t.export.description.as_bytes());
            option_reply(&mut out, option, REP_INFO, &d);
        }
        // Block sizes are always sent: minimum 1 (any alignment works),
        // preferred = the extent size, maximum = the largest payload.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&t.export.preferred_block.max(512).to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        option_reply(&mut out, option, REP_INFO, &d);
        option_reply(&mut out, option, REP_ACK, &[]);
        if option == OPT_GO {
            (out, Next::Transmit(t))
        } else {
            (out, Next::Continue)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the previous selection, even when it fails.
            self.meta = None;
        }
        if !self.structured {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies before metadata contexts",
            );
            return;
        }
        let mut cur = Cursor { data };
        let parsed = (|| {
            let name = cur.string()?;
            let n = cur.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(cur.string()?);
            }
            cur.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        if exports.lookup(name).is_none() {
            option_error(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
            return;
        }
        let mut chosen: Vec<(&str, u32)> = Vec::new();
        if queries.is_empty() {
            if !set {
                chosen.extend(META_CONTEXTS.iter().copied());
            }
        } else {
            for q in &queries {
                for &(ctx, id) in META_CONTEXTS {
                    let wildcard = !set && q.ends_with(':') && ctx.starts_with(q);
                    if (*q == ctx || wildcard) && !chosen.iter().any(|c| c.1 == id) {
                        chosen.push((ctx, id));
                    }
                }
            }
        }
        for (ctx, id) in &chosen {
            let mut d = Vec::with_capacity(4 + ctx.len());
            // LIST replies carry id 0: ids only mean something after SET.
            d.extend_from_slice(&(if set { *id } else { 0 }).to_be_bytes());
            d.extend_from_slice(ctx.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &d);
        }
        option_reply(out, option, REP_ACK, &[]);
        if set {
            self.meta = Some((name.to_string(), chosen.iter().map(|c| c.1).collect()));
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    struct One;
    impl Exports for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "vol1").then(|| ExportInfo {
                name: "vol1".into(),
                description: "test".into(),
                size: 1 << 20,
                read_only: false,
                preferred_block: 4096,
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![("vol1".into(), "test".into())]
        }
    }

    fn reply_kinds(bytes: &[u8]) -> Vec<u32> {
        let mut kinds = Vec::new();
        let mut b = bytes;
        while b.len() >= 20 {
            kinds.push(u32::from_be_bytes([b[12], b[13], b[14], b[15]]));
            let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]) as usize;
            b = &b[20 + len..];
        }
        kinds
    }

    fn meta_query(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn go(export: &str) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    #[test]
    fn unknown_client_flags_rejected() {
        assert!(Negotiation::new(1 << 5).is_err());
        assert!(Negotiation::new(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).is_ok());
    }

    #[test]
    fn starttls_without_certificates_is_refused_by_policy() {
        let mut n = Negotiation::new(3).unwrap();
        let (out, next) = n.option(OPT_STARTTLS, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_POLICY]);
        assert_eq!(next, Next::Continue);
        // And the plain negotiation goes on.
        let (_, next) = n.option(OPT_GO, &go("vol1"), &One, false);
        assert!(matches!(next, Next::Transmit(_)));
    }

    #[test]
    fn required_tls_refuses_every_option_but_starttls_and_abort() {
        let mut n = Negotiation::new(3).unwrap().with_tls(Tls::Required);
        for (option, data) in [
            (OPT_LIST, Vec::new()),
            (OPT_INFO, go("vol1")),
            (OPT_GO, go("vol1")),
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (OPT_EXTENDED_HEADERS, Vec::new()),
            (99, b"junk".to_vec()),
        ] {
            let (out, next) = n.option(option, &data, &One, false);
            assert_eq!(reply_kinds(&out), vec![REP_ERR_TLS_REQD], "option {option}");
            assert_eq!(next, Next::Continue);
        }
        // EXPORT_NAME has no error reply: the connection ends.
        let (out, next) = n.clone().option(OPT_EXPORT_NAME, b"vol1", &One, false);
        assert!(out.is_empty());
        assert_eq!(next, Next::Close);
        let (out, next) = n.clone().option(OPT_ABORT, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ACK]);
        assert_eq!(next, Next::Close);
        let (out, next) = n.option(OPT_STARTTLS, b"x", &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_INVALID]);
        assert_eq!(next, Next::Continue);
        let (out, next) = n.option(OPT_STARTTLS, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ACK]);
        assert_eq!(next, Next::StartTls);
    }

    #[test]
    fn required_tls_closes_a_client_without_fixed_newstyle() {
        let mut n = Negotiation::new(0).unwrap().with_tls(Tls::Required);
        let (out, next) = n.option(OPT_LIST, &[], &One, false);
        assert!(out.is_empty());
        assert_eq!(next, Next::Close);
        let mut n = Negotiation::new(0).unwrap().with_tls(Tls::Offered);
        let (out, _) = n.option(OPT_STARTTLS, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_POLICY]);
    }

    #[test]
    fn after_tls_everything_agreed_in_plain_text_is_forgotten() {
        let mut n = Negotiation::new(3).unwrap().with_tls(Tls::Offered);
        n.option(OPT_STRUCTURED_REPLY, &[], &One, false);
        n.option(
            OPT_SET_META_CONTEXT,
            &meta_query("vol1", &["base:allocation"]),
            &One,
            false,
        );
        let (_, next) = n.option(OPT_STARTTLS, &[], &One, false);
        assert_eq!(next, Next::StartTls);
        let mut t = n.after_tls();
        // Options are served now, STARTTLS again is invalid.
        let (out, next) = t.option(OPT_STARTTLS, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_INVALID]);
        assert_eq!(next, Next::Continue);
        let (out, next) = t.option(OPT_GO, &go("vol1"), &One, false);
        assert_eq!(*reply_kinds(&out).last().unwrap(), REP_ACK);
        let Next::Transmit(tr) = next else {
            panic!("GO over TLS did not transmit")
        };
        assert_eq!(tr.style, ReplyStyle::Simple);
        assert!(tr.contexts.is_empty());
    }

    #[test]
    fn offered_tls_allows_plain_text() {
        let mut n = Negotiation::new(3).unwrap().with_tls(Tls::Offered);
        let (out, next) = n.option(OPT_GO, &go("vol1"), &One, false);
        assert_eq!(*reply_kinds(&out).last().unwrap(), REP_ACK);
        assert!(matches!(next, Next::Transmit(_)));
    }

    #[test]
    fn unknown_option_is_unsup_and_continues() {
        let mut n = Negotiation::new(3).unwrap();
        let (out, next) = n.option(99, b"junk", &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_UNSUP]);
        assert_eq!(next, Next::Continue);
    }

    #[test]
    fn set_meta_before_structured_is_invalid() {
        let mut n = Negotiation::new(3).unwrap();
        let (out, _) = n.option(
            OPT_SET_META_CONTEXT,
            &meta_query("vol1", &["base:allocation"]),
            &One,
            false,
        );
        assert_eq!(reply_kinds(&out), vec![REP_ERR_INVALID]);
    }

    #[test]
    fn meta_context_applies_to_same_export_only() {
        let mut n = Negotiation::new(3).unwrap();
        n.option(OPT_STRUCTURED_REPLY, &[], &One, false);
        let (out, _) = n.option(
            OPT_SET_META_CONTEXT,
            &meta_query("vol1", &["base:allocation", "x:y"]),
            &One,
            false,
        );
        assert_eq!(reply_kinds(&out), vec![REP_META_CONTEXT, REP_ACK]);
        let (_, next) = n.option(OPT_GO, &go("vol1"), &One, false);
        let Next::Transmit(t) = next else {
            panic!("no transmit")
        };
        assert_eq!(t.contexts, vec![CONTEXT_BASE_ALLOCATION]);
        assert_eq!(t.style, ReplyStyle::Structured);
        assert!(t.flags & TF_SEND_DF != 0);
    }

    #[test]
    fn go_unknown_export() {
        let mut n = Negotiation::new(3).unwrap();
        let (out, next) = n.option(OPT_GO, &go("nope"), &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_UNKNOWN]);
        assert_eq!(next, Next::Continue);
        let (out, next) = n.option(OPT_EXPORT_NAME, b"nope", &One, false);
        assert!(out.is_empty());
        assert_eq!(next, Next::Close);
    }

    #[test]
    fn list_meta_wildcard() {
        let mut n = Negotiation::new(3).unwrap();
        n.option(OPT_STRUCTURED_REPLY, &[], &One, false);
        let (out, _) = n.option(
            OPT_LIST_META_CONTEXT,
            &meta_query("vol1", &["base:"]),
            &One,
            false,
        );
        assert_eq!(reply_kinds(&out), vec![REP_META_CONTEXT, REP_ACK]);
        let (out, _) = n.option(
            OPT_SET_META_CONTEXT,
            &meta_query("vol1", &["base:"]),
            &One,
            false,
        );
        assert_eq!(reply_kinds(&out), vec![REP_ACK]);
    }

    #[test]
    fn structured_after_extended() {
        let mut n = Negotiation::new(3).unwrap();
        n.option(OPT_EXTENDED_HEADERS, &[], &One, false);
        let (out, _) = n.option(OPT_STRUCTURED_REPLY, &[], &One, false);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_EXT_HEADER_REQD]);
    }

    #[test]
    fn shutdown_refuses_options() {
        let mut n = Negotiation::new(3).unwrap();
        let (out, _) = n.option(OPT_GO, &go("vol1"), &One, true);
        assert_eq!(reply_kinds(&out), vec![REP_ERR_SHUTDOWN]);
    }
}
