//! `blockctl repo`: maintenance of a location's repository.

use crate::failure::Failure;
use blockd_api::{human_size, CheckReport, CheckRequest, GcReport, GcRequest, MaxUnused, Subset};
use clap::{Args, Subcommand};

use crate::client::Client;
use crate::output::{line, Output};

/// `blockctl repo ...`.
#[derive(Debug, Subcommand)]
pub enum RepoCmd {
    /// Check that every snapshot of a location can be restored: the config,
    /// every manifest and index block, and that every pack and record they
    /// need exists; with --read-data, every record's seal and hash too.
    /// Exits 1 when anything is damaged. Takes no lock: backups may run.
    #[command(
        after_help = "Examples:\n  blockctl repo check\n  blockctl repo check --read-data --subset 1/7 --cred-id s3"
    )]
    Check(CheckArgs),
    /// Reclaim packs and index blocks no snapshot references, and repack
    /// packs that are mostly dead or small. Safe while backups run on this
    /// host or others sharing the bucket: a run marks what is unreferenced
    /// (and what it repacked), and a later run deletes it once the mark is
    /// older than the grace period, if still unreferenced
    #[command(
        after_help = "Examples:\n  blockctl repo gc --dry-run\n  blockctl repo gc --cred-id s3"
    )]
    Gc(GcArgs),
}

/// Arguments of `blockctl repo gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Credentials (location) to collect [default: the only ones, when just one exists]
    #[arg(long, alias = "cr", value_name = "NAME")]
    cred_id: Option<String>,
    /// Report what would be marked and deleted; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Grace period of what this run marks, e.g. 24h [default: the daemon's --gc-grace]
    #[arg(long, value_name = "DURATION", value_parser = grace_arg)]
    grace: Option<u64>,
    /// Unused space tolerated inside packs still in use before their live
    /// records are copied into new packs (and the old ones reclaimed): a
    /// percentage, e.g. 5%, or `unlimited` to never repack [default: the
    /// daemon's --gc-max-unused]
    #[arg(long, value_name = "PERCENT|unlimited")]
    max_unused: Option<MaxUnused>,
}

/// Arguments of `blockctl repo check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Credentials (location) to check [default: the only ones, when just one exists]
    #[arg(long, alias = "cr", value_name = "NAME")]
    cred_id: Option<String>,
    /// Also read the packs and check every record (costs a full download)
    #[arg(long)]
    read_data: bool,
    /// With --read-data: only these packs, chosen by pack id: n/m (the
    /// n-th of m slices; runs 1/m .. m/m read everything once) or x%
    #[arg(long, value_name = "n/m|x%", requires = "read_data", value_parser = subset_arg)]
    subset: Option<String>,
}

/// A grace period as `--grace` takes it: `24h`, `90m`, `45s`.
fn grace_text(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A grace period in whole seconds, at least one.
fn grace_arg(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}): use e.g. 24h, 30m or 90s"))?;
    match d.as_secs() {
        0 => Err("the grace period must be at least 1s".into()),
        n => Ok(n),
    }
}

fn subset_arg(s: &str) -> Result<String, String> {
    s.parse::<Subset>().map(|_| s.to_string())
}

/// Runs a `blockctl repo` command.
pub async fn run(out: Output, client: &Client, cmd: &RepoCmd) -> Result<(), Failure> {
    match cmd {
        RepoCmd::Check(args) => check(out, client, args).await,
        RepoCmd::Gc(args) => gc(out, client, args).await,
    }
}

async fn check(out: Output, client: &Client, args: &CheckArgs) -> Result<(), Failure> {
    let req = CheckRequest {
        location: args.cred_id.clone(),
        read_data: args.read_data,
        subset: args.subset.clone(),
    };
    let r: CheckReport = client.call("POST", "/v1/repo/check", Some(&req)).await?;
    out.answer(&r, show_check);
    if r.problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "location {}: {} damaged object(s), {} snapshot(s) affected{}",
            r.location,
            r.problems.len(),
            r.damaged.len(),
            match (r.damaged.is_empty(), &r.recorded) {
                (true, _) => String::new(),
                (false, Some(_)) => ": restore them from elsewhere or delete them (`blockctl cloudsnap delete --snap ID`); the damage is recorded in the repository, and new backups read what used it from their volumes again instead of reusing it".into(),
                (false, None) => ": restore them from elsewhere or delete them (`blockctl cloudsnap delete --snap ID`); these credentials may only read, so the damage is not recorded and new backups of their volumes (`--full` ones too) may reuse it: delete them before the next backup".into(),
            }
        ).into())
    }
}

fn show_check(r: &CheckReport) {
    line(format_args!(
        "location {}: {} snapshot(s), {} index block(s), {} pack(s), {} record(s) referenced",
        r.location, r.snapshots, r.index_blocks, r.packs, r.records
    ));
    if let Some(d) = &r.data {
        line(format_args!(
            "read {} pack(s){}: {} record(s) checked, {} fetched",
            d.packs,
            d.subset
                .as_deref()
                .map(|s| format!(" (subset {s})"))
                .unwrap_or_default(),
            d.records,
            human_size(d.bytes)
        ));
    }
    if r.unreferenced_packs + r.unreferenced_index_blocks > 0 {
        // A damaged manifest, index map or index block hides what it
        // references: that may be among the unreferenced, and collection
        // refuses to run until it is gone.
        let hidden = r.problems.iter().any(|p| !p.object.starts_with("packs/"));
        line(format_args!(
            "unreferenced: {} pack(s), {} index block(s) ({})",
            r.unreferenced_packs,
            r.unreferenced_index_blocks,
            if hidden {
                "some may be what the damaged objects below reference; `blockctl repo gc` collects nothing until the snapshots that need them are deleted"
            } else {
                "reclaimed by `blockctl repo gc`"
            }
        ));
    }
    for p in &r.problems {
        line(format_args!("damaged: {}: {}", p.object, p.reason));
    }
    for d in &r.damaged {
        line(format_args!(
            "snapshot {} needs damaged {}",
            d.snapshot,
            d.objects.join(", ")
        ));
    }
    if let Some(recorded) = r.recorded.as_ref().filter(|o| !o.is_empty()) {
        line(format_args!(
            "recorded as damaged, not reused by new backups: {} (until a check finds them whole, or no snapshot uses them)",
            recorded.join(", ")
        ));
    }
    if r.problems.is_empty() {
        line("no errors were found");
    }
}

/// What a collection run counts, in words: the bytes it reports are
/// theirs together, so every kind that has any is named.
fn objects(packs: u64, index: u64, relocations: u64, partial: u64) -> String {
    let mut parts = vec![
        format!("{packs} pack(s)"),
        format!("{index} index block(s)"),
    ];
    if relocations > 0 {
        parts.push(format!("{relocations} relocation record(s)"));
    }
    if partial > 0 {
        parts.push(format!(
            "{partial} unfinished write(s) left by killed writers"
        ));
    }
    let last = parts.pop().unwrap_or_default();
    if parts.is_empty() {
        last
    } else {
        format!("{} and {last}", parts.join(", "))
    }
}

async fn gc(out: Output, client: &Client, args: &GcArgs) -> Result<(), Failure> {
    let req = GcRequest {
        location: args.cred_id.clone(),
        dry_run: args.dry_run,
        grace_secs: args.grace,
        max_unused: args.max_unused,
    };
    let r: GcReport = client.call("POST", "/v1/repo/gc", Some(&req)).await?;
    out.answer(&r, |r| {
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        line(format_args!(
            "location {}: {verb} {}, {}",
            r.location,
            objects(
                r.deleted_packs,
                r.deleted_index_blocks,
                r.deleted_relocations,
                r.deleted_partial
            ),
            human_size(r.deleted_bytes)
        ));
        let verb = if r.dry_run { "would mark" } else { "marked" };
        line(format_args!(
            "{verb} {}, {}, unreferenced now: deleted by a run after {} if still unreferenced",
            objects(
                r.marked_packs,
                r.marked_index_blocks,
                r.marked_relocations,
                0
            ),
            human_size(r.marked_bytes),
            grace_text(r.grace_secs)
        ));
        let verb = if r.dry_run {
            "would repack"
        } else {
            "repacked"
        };
        line(format_args!(
            "in packs in use: {} used, {} unused (limit {}); {verb} {} pack(s), copying {}{}",
            human_size(r.used_bytes),
            human_size(r.unused_bytes),
            r.max_unused,
            r.repacked_packs,
            human_size(r.repacked_bytes),
            if r.dry_run {
                String::new()
            } else {
                format!(" into {} new pack(s)", r.written_packs)
            }
        ));
        for s in &r.skipped {
            line(format_args!("not repacked: {s}"));
        }
        if r.kept > 0 {
            line(format_args!(
                "kept {} condemned object(s) found in use again",
                r.kept
            ));
        }
        if r.pending_marks > 0 {
            line(format_args!(
                "{} earlier mark(s) still in their grace period",
                r.pending_marks
            ));
        }
        if r.held_marks > 0 {
            line(format_args!(
                "{} mark(s) wait for backups that started before them or running restores: {}",
                r.held_marks,
                r.holding.join(", ")
            ));
        }
        for d in &r.damaged {
            line(format_args!(
                "snapshot {} needs damaged {}",
                d.snapshot,
                d.objects.join(", ")
            ));
        }
    });
    if r.problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "location {}: the collection ran, and found {} damaged pack(s) it could not repack ({}), needed by {} snapshot(s): the damage is recorded in the repository, so new backups read what used it from their volumes again instead of reusing it; run `blockctl repo check --read-data{}` to see all of it, and restore the snapshots that need it from elsewhere or delete them (`blockctl cloudsnap delete --snap ID`)",
        r.location,
        r.problems.len(),
        r.problems
            .iter()
            .map(|p| p.object.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        r.damaged.len(),
        args.cred_id
            .as_deref()
            .map(|c| format!(" --cred-id {c}"))
            .unwrap_or_default(),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::{grace_arg, grace_text};

    #[test]
    fn grace_prints_as_it_is_given() {
        assert_eq!(grace_text(86_400), "24h");
        assert_eq!(grace_text(5_400), "90m");
        assert_eq!(grace_text(61), "61s");
        for given in ["24h", "90m", "1s", "61s"] {
            assert_eq!(grace_text(grace_arg(given).unwrap()), given);
        }
    }
}
