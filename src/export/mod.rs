//! Streaming exports of claims: one row at a time from the store to the
//! writer, so memory stays flat however many claims there are.
//!
//! CSV is RFC 4180 with every field that does not read as a number quoted
//! ([`spreadsheet_csv`]), UTF-8, with a header row; Chinese names survive
//! intact. Text a user or an organiser chose (usernames,
//! nicknames, codes, ids) is neutralised against formula injection (OWASP):
//! a cell starting with `=`, `+`, `-`, `@`, tab or carriage return gets a
//! leading `'`, so a spreadsheet shows `=HYPERLINK(...)` as text instead of
//! running it. JSON lines and Parquet carry values exactly. JSON lines carry the same fields, one object a line.
//! [`rejections`] writes the recorded claim outcomes per minute, and
//! [`report`] renders the HTML rush report.

pub mod parquet;
pub mod report;
pub mod svg;

use std::io::Write;

use clap::ValueEnum;

use crate::{
    clock::rfc3339_ms,
    store::{ClaimRow, Store, StoreError},
};

/// Export output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header row, UTF-8.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet (claims only; use --out).
    Parquet,
}

/// The CSV header, in column order.
pub const CSV_HEADER: [&str; 9] = [
    "claim_id",
    "activity_id",
    "ticket_id",
    "code",
    "user_id",
    "username",
    "nickname",
    "node",
    "claimed_at",
];

/// Writes every claim of `activity_id` to `out`; returns the row count.
pub fn claims<W: Write + Send>(
    store: &Store,
    activity_id: &str,
    format: ExportFormat,
    out: W,
) -> Result<u64, StoreError> {
    match format {
        ExportFormat::Parquet => parquet::claims(store, activity_id, out),
        ExportFormat::Csv => {
            let mut w = spreadsheet_csv(out);
            w.write_record(CSV_HEADER).map_err(csv_io).map_err(io_err)?;
            let n = store.export_claims(activity_id, &mut |row: ClaimRow| {
                w.write_record([
                    row.claim_id.to_string().as_str(),
                    &cell(&row.activity_id),
                    &cell(&row.ticket_id),
                    &cell(&row.code),
                    &row.user_id.to_string(),
                    &cell(&row.username),
                    &cell(&row.nickname),
                    &cell(&row.node),
                    &rfc3339_ms(row.claimed_at_ms),
                ])
                .map_err(csv_io)
            })?;
            w.flush().map_err(io_err)?;
            Ok(n)
        }
        ExportFormat::Jsonl => {
            let mut w = out;
            let n = store.export_claims(activity_id, &mut |row: ClaimRow| {
                #[derive(serde::Serialize)]
                struct Line<'a> {
                    #[serde(flatten)]
                    row: &'a ClaimRow,
                    claimed_at: String,
                }
                let line = Line {
                    claimed_at: rfc3339_ms(row.claimed_at_ms),
                    row: &row,
                };
                serde_json::to_writer(&mut w, &line)?;
                w.write_all(b"\n")
            })?;
            w.flush().map_err(io_err)?;
            Ok(n)
        }
    }
}

/// Writes the recorded claim outcomes of `activity_id` per minute (everything
/// but successes), as CSV or JSON lines; returns the row count.
pub fn rejections<W: Write>(store: &Store, activity_id: &str, format: ExportFormat, out: W) -> Result<u64, StoreError> {
    let data = store.report_data(activity_id, 0)?;
    // Recorded per tick; written per minute.
    let mut per_minute: std::collections::BTreeMap<(i64, &str), u64> = std::collections::BTreeMap::new();
    for (at_ms, outcome, count) in &data.outcomes {
        if outcome != "success" && outcome != "replayed" {
            *per_minute.entry((at_ms.div_euclid(60_000), outcome)).or_default() += count;
        }
    }
    let rows = per_minute
        .into_iter()
        .map(|((minute, reason), count)| (minute, reason, count));
    let mut n = 0;
    match format {
        // The CLI refuses Parquet for rejections; CSV is the fallback here.
        ExportFormat::Csv | ExportFormat::Parquet => {
            let mut w = spreadsheet_csv(out);
            w.write_record(["minute", "reason", "count"])
                .map_err(csv_io)
                .map_err(io_err)?;
            for (minute, reason, count) in rows {
                w.write_record([rfc3339_ms(minute * 60_000).as_str(), reason, &count.to_string()])
                    .map_err(csv_io)
                    .map_err(io_err)?;
                n += 1;
            }
            w.flush().map_err(io_err)?;
        }
        ExportFormat::Jsonl => {
            let mut w = out;
            for (minute, reason, count) in rows {
                let line =
                    serde_json::json!({ "minute": rfc3339_ms(minute * 60_000), "reason": reason, "count": count });
                writeln!(w, "{line}").map_err(io_err)?;
                n += 1;
            }
            w.flush().map_err(io_err)?;
        }
    }
    Ok(n)
}

/// A CSV writer for files organisers open in spreadsheets: every text
/// field quoted. With a `;` list separator (German or French Excel, say) a
/// spreadsheet splits an unquoted field at each `;`, and a nickname
/// `x;=1+1` became a cell holding a formula that [`cell`]'s first-character
/// check never saw; a quoted field is not split.
pub fn spreadsheet_csv<W: std::io::Write>(out: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::NonNumeric)
        // RFC 4180's line ending, as README promises (it was `\n`).
        .terminator(csv::Terminator::CRLF)
        .from_writer(out)
}

/// A text cell safe to open in a spreadsheet: one that a spreadsheet would
/// read as a formula gets a leading `'` (borrowed when nothing changes).
pub fn cell(text: &str) -> std::borrow::Cow<'_, str> {
    match text.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{text}").into(),
        _ => text.into(),
    }
}

/// The I/O error itself when there is one (wrapped, a full disk said so
/// twice).
fn csv_io(e: csv::Error) -> std::io::Error {
    if !e.is_io_error() {
        return std::io::Error::other(e);
    }
    match e.into_kind() {
        csv::ErrorKind::Io(io) => io,
        kind => std::io::Error::other(format!("{kind:?}")),
    }
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Io {
        what: "cannot write the export to",
        path: "the output".into(),
        source: e,
    }
}
