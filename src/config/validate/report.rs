//! What validation reports: a problem and its line, and how lines are found
//! (a second, span-keeping parse of the same text with `toml_edit`).

use std::fmt::Write as _;

use toml_edit::{ImDocument, Item, Table, TableLike, Value};

/// Longest accepted activity or ticket id, in bytes.
pub(super) const MAX_ID_LEN: usize = 64;
/// Longest accepted code, in bytes.
pub(super) const MAX_CODE_LEN: usize = 128;
/// Most codes one ticket may generate.
pub(super) const MAX_GENERATE: u32 = 10_000_000;

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the config file, when known.
    pub line: Option<usize>,
    /// What is wrong, as a sentence.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// "N problem(s):" and one line per problem, for the error messages.
pub(crate) fn list(problems: &[Problem]) -> String {
    let mut out = format!("{} problem(s):\n", problems.len());
    for p in problems {
        let _ = writeln!(out, "  - {p}");
    }
    out.trim_end().to_owned()
}

/// A path into the TOML document: `activity[1].ticket[0].codes`.
#[derive(Clone, Copy)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

pub(super) struct Lines<'t> {
    pub text: &'t str,
    pub doc: Option<ImDocument<&'t str>>,
}

impl Lines<'_> {
    /// Whether the file itself sets the key at `path` (not a default),
    /// in tables or inline ones (`activity = [{ id = "a", … }]`). Always
    /// false without a document (definitions stored in MongoDB).
    pub fn sets(&self, path: &[Seg<'_>]) -> bool {
        let Some(doc) = self.doc.as_ref() else {
            return false;
        };
        let mut table: &dyn TableLike = doc.as_table();
        let mut segs = path.iter().peekable();
        while let Some(seg) = segs.next() {
            let Seg::Key(key) = *seg else { return false };
            let Some(item) = table.get(key) else { return false };
            let next: Option<&dyn TableLike> = match (item, segs.peek()) {
                (_, None) => return true,
                (Item::ArrayOfTables(array), Some(&&Seg::Index(i))) => {
                    segs.next();
                    array.get(i).map(|t| t as &dyn TableLike)
                }
                (Item::Value(Value::Array(array)), Some(&&Seg::Index(i))) => {
                    segs.next();
                    array
                        .get(i)
                        .and_then(Value::as_inline_table)
                        .map(|t| t as &dyn TableLike)
                }
                (item, _) => item.as_table_like(),
            };
            let Some(next) = next else { return false };
            table = next;
        }
        false
    }

    /// The line of the deepest item on `path` that the document has.
    fn of(&self, path: &[Seg<'_>]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut table: &Table = doc.as_table();
        let mut best = None;
        let mut segs = path.iter().peekable();
        while let Some(seg) = segs.next() {
            let Seg::Key(key) = *seg else { break };
            let Some(item) = table.get(key) else { break };
            best = item.span().or(best);
            match (item, segs.peek()) {
                (Item::Table(t), _) => table = t,
                (Item::ArrayOfTables(array), Some(Seg::Index(i))) => {
                    let Some(t) = array.get(*i) else { break };
                    best = t.span().or(best);
                    table = t;
                    segs.next();
                }
                _ => break,
            }
        }
        self.line_at(best)
    }

    fn line_at(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.text.get(..start)?.matches('\n').count() + 1)
    }
}

pub(super) struct Report<'t> {
    pub lines: Lines<'t>,
    pub problems: Vec<Problem>,
    /// Keys set to no effect: said (by `check-config`, at start and at a
    /// reload), not refused — a config an earlier version ran must still
    /// start after an upgrade.
    pub warnings: Vec<Problem>,
}

impl Report<'_> {
    pub fn add(&mut self, path: &[Seg<'_>], message: String) {
        let line = self.lines.of(path);
        self.problems.push(Problem { line, message });
    }

    pub fn warn(&mut self, path: &[Seg<'_>], message: String) {
        let line = self.lines.of(path);
        self.warnings.push(Problem { line, message });
    }
}

pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
