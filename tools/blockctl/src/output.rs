//! Everything blockctl prints on stdout goes through here: JSON for
//! `-j/--json`, tables, `Key: value` views and lines of text.
//!
//! Other modules decide what to show; this one decides how it looks.
//! Cargo.toml turns on `clippy::print_stdout`, allowed only in this
//! module, so a `println!` anywhere else fails `clippy -D warnings`.

#![allow(clippy::print_stdout)]

use std::fmt::Display;
use std::io::Write;

use blockd_api::Hook;
use serde::Serialize;

/// How a command's answer is shown: JSON (`-j/--json`) or text for people.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `-j/--json` was given.
    json: bool,
}

impl Output {
    /// JSON output when `json`, text otherwise.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// True with `-j/--json`.
    pub fn is_json(self) -> bool {
        self.json
    }

    /// Shows a command's answer: `value` as JSON, or else what `text`
    /// prints from it.
    pub fn answer<T: Serialize + ?Sized>(self, value: &T, text: impl FnOnce(&T)) {
        if self.json {
            json(value);
        } else {
            text(value);
        }
    }
}

/// Prints `v` as pretty-printed JSON and a newline.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => out(format_args!("{s}")),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

/// Prints an error on stderr as one line of JSON: `{"error": "...",
/// "exit_status": N}`.
pub fn error_json(message: &str, exit_status: u8) {
    eprintln!(
        "{}",
        serde_json::json!({ "error": message, "exit_status": exit_status })
    );
}

/// Prints a line of text.
pub fn line(text: impl Display) {
    out(format_args!("{text}"));
}

/// Writes bytes as they are (a generated completion script).
pub fn raw(bytes: &[u8]) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(bytes).and_then(|()| o.flush()) {
        stdout_failed(&e);
    }
}

/// Writes one line on stdout. A reader that has gone (`blockctl ... |
/// head`) ends the program as it ends other command-line tools, by
/// SIGPIPE; any other failure to write says so and exits 1.
///
/// SIGPIPE stays ignored, as Rust starts programs, everywhere else: a
/// write to the daemon's socket after blockd went (a `--wait` across a
/// restart) must come back as an error blockctl explains, not end the
/// program without a word.
fn out(args: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        stdout_failed(&e);
    }
}

/// Ends the program after a failed write on stdout (see [`out`]).
fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        die_of_sigpipe();
    }
    eprintln!("error: writing the answer on stdout: {e}");
    std::process::exit(1);
}

/// Ends the program by SIGPIPE, its default action put back first, so
/// that a shell sees what it sees of any tool whose reader went (status
/// 141).
#[allow(unsafe_code)]
fn die_of_sigpipe() -> ! {
    // SAFETY: `signal` with SIG_DFL installs no handler code of ours, and
    // `raise` only sends the signal to this thread; the program is ending
    // here, so no other part of it relies on SIGPIPE being ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141);
}

/// Prints a table: the header, then a line per row, with left-aligned
/// columns two spaces apart and no trailing blanks.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let s: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out(format_args!("{}", s.join("  ").trim_end()));
    };
    line(header);
    for r in rows {
        line(&r.each_ref().map(String::as_str));
    }
}

/// Width of the key column of a `Key: value` view, colon included.
const KEY_WIDTH: usize = 13;

/// Prints one line of a `Key: value` view, values aligned after the
/// widest key (`Bytes reused:`).
pub fn field(key: &str, value: impl Display) {
    out(format_args!("{:<KEY_WIDTH$} {value}", format!("{key}:")));
}

/// Prints the freeze of a snapshot in a `Key: value` view: how long I/O
/// was held, and the exec hooks around it.
pub fn freeze(pause_us: u64, pre: Option<&Hook>, post: Option<&Hook>) {
    field(
        "I/O pause",
        format_args!("{:.3} ms", pause_us as f64 / 1000.0),
    );
    hook("Pre-exec", pre);
    hook("Post-exec", post);
}

/// Prints, in a `Key: value` view, an exec hook's command and outcome and
/// the first 20 lines of its output, if it ran.
pub fn hook(key: &str, h: Option<&Hook>) {
    if let Some(h) = h {
        let outcome = if h.timed_out {
            "timed out".to_string()
        } else {
            h.exit_code.map_or("killed".into(), |c| format!("exit {c}"))
        };
        field(key, format_args!("`{}` ({outcome})", h.command));
        for line in h.output.lines().take(20) {
            out(format_args!("{:KEY_WIDTH$} | {line}", ""));
        }
    }
}
