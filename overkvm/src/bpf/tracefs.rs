//! Read-only access to tracefs: where it is mounted, which events exist, and their record
//! formats.
//!
//! overkvm attaches through BTF and does not need tracefs; it is consulted for diagnostics and
//! to cross-check event layouts that changed between kernels (Linux 6.11 inserted `ioprio` into
//! the `block_rq_*` records). Nothing here mounts anything or writes to tracefs. Format files
//! are parsed as untrusted text: bad input gives a `FormatError`, never a panic.

use std::{
    error::Error,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Where tracefs is usually mounted, in order of preference.
const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point in use: /sys/kernel/tracing if it has an `events` dir, else
/// /sys/kernel/debug/tracing if it has one, else None. Never mounts anything.
pub fn find_tracefs() -> Option<PathBuf> {
    find_tracefs_in(CANDIDATES.iter().map(Path::new))
}

/// The first candidate with an `events` directory (an unmounted mount point is an empty dir).
fn find_tracefs_in<'a>(candidates: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .find(|c| c.join("events").is_dir())
        .map(Path::to_path_buf)
}

/// True for a plain directory-entry name, so `system`/`event` cannot escape `events/`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Directory of an event, `None` when a name is not a plain entry name.
fn event_dir(tracefs: &Path, system: &str, event: &str) -> Option<PathBuf> {
    (is_plain_name(system) && is_plain_name(event))
        .then(|| tracefs.join("events").join(system).join(event))
}

/// True if the event exists (`events/<system>/<event>/id` is there).
pub fn event_exists(tracefs: &Path, system: &str, event: &str) -> bool {
    event_dir(tracefs, system, event).is_some_and(|d| d.join("id").exists())
}

/// One field of a trace event record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    /// The declaration without the name, e.g. `unsigned int`, `char[8]`, `__data_loc char[]`.
    pub c_type: String,
    /// Byte offset in the record, common fields included.
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// A parsed `events/<system>/<event>/format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    pub id: u32,
    /// In file order, common fields first.
    pub fields: Vec<FormatField>,
}

impl EventFormat {
    /// The first field with that name.
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Why a format file could not be parsed. Line numbers start at 1.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// No `name:` line.
    MissingName,
    /// No `ID:` line.
    MissingId,
    /// The `ID:` value is not a u32.
    BadId { line: usize, text: String },
    /// A `field:` line that does not parse.
    BadField {
        line: usize,
        reason: &'static str,
        text: String,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::MissingName => f.write_str("event format has no `name:` line"),
            FormatError::MissingId => f.write_str("event format has no `ID:` line"),
            FormatError::BadId { line, text } => {
                write!(f, "line {line}: event ID is not a 32-bit number: {text:?}")
            }
            FormatError::BadField { line, reason, text } => {
                write!(f, "line {line}: {reason}: {text:?}")
            }
        }
    }
}

impl Error for FormatError {}

/// At most this many characters of an offending line go into an error, so a hostile file
/// cannot make messages huge.
const QUOTE_CHARS: usize = 80;

fn quote(line: &str) -> String {
    let mut q: String = line.trim().chars().take(QUOTE_CHARS).collect();
    if line.trim().chars().nth(QUOTE_CHARS).is_some() {
        q.push('…');
    }
    q
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Splits a C declaration into (name, type without the name).
///
/// The name is the last identifier before the array suffix, if any: `char rwbs[8]` is `rwbs`
/// of `char[8]`, while in `__data_loc char[] cmd` the brackets belong to the type and the name
/// is `cmd`.
fn split_decl(decl: &str) -> Option<(String, String)> {
    let decl = decl.trim();
    // Strip trailing `[...]` groups (there may be several dimensions).
    let mut head = decl;
    while let Some(rest) = head.strip_suffix(']') {
        let open = rest.rfind('[')?;
        head = rest[..open].trim_end();
    }
    let suffix = &decl[head.len()..];
    let name_start = head
        .char_indices()
        .rev()
        .take_while(|&(_, c)| is_ident_char(c))
        .last()
        .map(|(i, _)| i)?;
    let name = &head[name_start..];
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let ty = head[..name_start].trim_end();
    // A declaration always has a type; `char [8]` has no name.
    if ty.is_empty() {
        return None;
    }
    Some((name.to_string(), format!("{ty}{}", suffix.trim_start())))
}

/// Parses one `field:...;offset:N;size:N;signed:N;` line (the part after `field`).
fn parse_field(line_no: usize, line: &str) -> Result<FormatField, FormatError> {
    let bad = |reason| FormatError::BadField {
        line: line_no,
        reason,
        text: quote(line),
    };
    let (mut decl, mut offset, mut size, mut signed) = (None, None, None, None);
    for part in line.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| bad("field attribute without `:`"))?;
        let number = || {
            value
                .trim()
                .parse::<u32>()
                .map_err(|_| bad("not a 32-bit number"))
        };
        match key.trim() {
            // `field` or, for a few ftrace-internal events, `field special`.
            k if k.starts_with("field") => decl = Some(value),
            "offset" => offset = Some(number()?),
            "size" => size = Some(number()?),
            "signed" => signed = Some(number()? != 0),
            // Unknown attributes from newer kernels are ignored.
            _ => {}
        }
    }
    let offset = offset.ok_or_else(|| bad("field has no offset"))?;
    let size = size.ok_or_else(|| bad("field has no size"))?;
    let decl = decl.ok_or_else(|| bad("no field declaration"))?;
    let (name, c_type) = split_decl(decl).ok_or_else(|| bad("no field name in declaration"))?;
    Ok(FormatField {
        name,
        c_type,
        offset,
        size,
        // Very old kernels had no `signed:` attribute.
        signed: signed.unwrap_or(false),
    })
}

/// Parses an events/<sys>/<event>/format file (lines like
/// "\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;", arrays like "char rwbs[8]",
/// "__data_loc char[] cmd").
pub fn parse_format(text: &str) -> Result<EventFormat, FormatError> {
    let (mut name, mut id) = (None, None);
    let mut fields = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        // The print format is free text that may mention `field:`; nothing follows it.
        if trimmed.starts_with("print fmt:") {
            break;
        }
        if let Some(v) = trimmed.strip_prefix("name:") {
            name.get_or_insert_with(|| v.trim().to_string());
        } else if let Some(v) = trimmed.strip_prefix("ID:") {
            let v = v.trim().parse::<u32>().map_err(|_| FormatError::BadId {
                line: line_no,
                text: quote(line),
            })?;
            id.get_or_insert(v);
        } else if trimmed.starts_with("field") {
            fields.push(parse_field(line_no, trimmed)?);
        }
    }
    Ok(EventFormat {
        name: name
            .filter(|n| !n.is_empty())
            .ok_or(FormatError::MissingName)?,
        id: id.ok_or(FormatError::MissingId)?,
        fields,
    })
}

/// Reads and parses the format of `<system>/<event>`.
pub fn read_format(tracefs: &Path, system: &str, event: &str) -> anyhow::Result<EventFormat> {
    let dir = event_dir(tracefs, system, event)
        .with_context(|| format!("invalid trace event name {system:?}/{event:?}"))?;
    let path = dir.join("format");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_format(&String::from_utf8_lossy(&bytes))
        .with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMON: &str = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
";

    /// block_rq_complete before Linux 6.11.
    fn rq_complete_old() -> String {
        format!(
            "name: block_rq_complete
ID: 1180
format:
{COMMON}
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:1;

print fmt: \"%d,%d %s (%s) %llu + %u [%d]\", ((unsigned int) ((REC->dev) >> 20)), \
((unsigned int) ((REC->dev) & ((1U << 20) - 1))), REC->rwbs, __get_str(cmd), \
(unsigned long long)REC->sector, REC->nr_sector, REC->error
"
        )
    }

    /// block_rq_complete from Linux 6.11 on: `ioprio` after `error` moves `rwbs` and `cmd`.
    fn rq_complete_new() -> String {
        format!(
            "name: block_rq_complete
ID: 1432
format:
{COMMON}
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[8];\toffset:34;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u %s,%u,%u [%d]\", ((unsigned int) ((REC->dev) >> 20)), \
((unsigned int) ((REC->dev) & ((1U << 20) - 1))), REC->rwbs, __get_str(cmd), \
(unsigned long long)REC->sector, REC->nr_sector, __print_symbolic((((REC->ioprio) >> 13) \
& (8 - 1))), (((REC->ioprio) >> 3) & ((1 << 10) - 1)), ((REC->ioprio) & ((1 << 3) - 1)), \
REC->error
"
        )
    }

    fn f(name: &str, c_type: &str, offset: u32, size: u32, signed: bool) -> FormatField {
        FormatField {
            name: name.into(),
            c_type: c_type.into(),
            offset,
            size,
            signed,
        }
    }

    #[test]
    fn parses_block_rq_complete_before_6_11() {
        let fmt = parse_format(&rq_complete_old()).unwrap();
        assert_eq!(fmt.name, "block_rq_complete");
        assert_eq!(fmt.id, 1180);
        assert_eq!(fmt.fields.len(), 10);
        assert_eq!(
            fmt.field("common_pid"),
            Some(&f("common_pid", "int", 4, 4, true))
        );
        assert_eq!(fmt.field("dev"), Some(&f("dev", "dev_t", 8, 4, false)));
        assert_eq!(
            fmt.field("nr_sector"),
            Some(&f("nr_sector", "unsigned int", 24, 4, false))
        );
        assert_eq!(fmt.field("rwbs"), Some(&f("rwbs", "char[8]", 32, 8, true)));
        assert_eq!(
            fmt.field("cmd"),
            Some(&f("cmd", "__data_loc char[]", 40, 4, true))
        );
        assert!(fmt.field("ioprio").is_none());
    }

    #[test]
    fn parses_block_rq_complete_from_6_11() {
        let fmt = parse_format(&rq_complete_new()).unwrap();
        assert_eq!(fmt.id, 1432);
        assert_eq!(fmt.fields.len(), 11);
        assert_eq!(
            fmt.field("ioprio"),
            Some(&f("ioprio", "unsigned short", 32, 2, false))
        );
        assert_eq!(fmt.field("rwbs").map(|f| f.offset), Some(34));
        assert_eq!(fmt.field("cmd").map(|f| f.offset), Some(44));
        assert_eq!(
            fmt.field("error").map(|f| (f.offset, f.signed)),
            Some((28, true))
        );
    }

    #[test]
    fn declarations_split_into_name_and_type() {
        for (decl, name, ty) in [
            ("unsigned int bytes", "bytes", "unsigned int"),
            ("char rwbs[8]", "rwbs", "char[8]"),
            ("char comm[TASK_COMM_LEN]", "comm", "char[TASK_COMM_LEN]"),
            ("__data_loc char[] cmd", "cmd", "__data_loc char[]"),
            ("__rel_loc char[] name", "name", "__rel_loc char[]"),
            ("u8 grid[2][3]", "grid", "u8[2][3]"),
            ("const char * name", "name", "const char *"),
            ("void *ptr", "ptr", "void *"),
        ] {
            assert_eq!(
                split_decl(decl),
                Some((name.to_string(), ty.to_string())),
                "{decl}"
            );
        }
        for bad in [
            "",
            "x",
            "char [8]",
            "int *",
            "char x[",
            "]",
            "int 9lives",
            "[]",
        ] {
            assert_eq!(split_decl(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hostile_formats_are_errors() {
        let ok_head = "name: e\nID: 5\nformat:\n";
        let cases = [
            ("", FormatError::MissingName),
            ("ID: 3\n", FormatError::MissingName),
            ("name:\nID: 3\n", FormatError::MissingName),
            ("name: e\n", FormatError::MissingId),
        ];
        for (text, want) in cases {
            assert_eq!(parse_format(text), Err(want), "{text:?}");
        }
        for (text, reason) in [
            ("ID: 99999999999999\n", None),
            ("ID: -1\n", None),
            ("\tfield:int", Some("field has no offset")),
            ("\tfield:int x;\tsize:4;", Some("field has no offset")),
            ("\tfield:int x;\toffset:4;", Some("field has no size")),
            (
                "\tfield:int x;\toffset:abc;\tsize:4;",
                Some("not a 32-bit number"),
            ),
            (
                "\tfield:int x;\toffset:4294967296;\tsize:4;",
                Some("not a 32-bit number"),
            ),
            (
                "\tfield:int x;\toffset:-4;\tsize:4;",
                Some("not a 32-bit number"),
            ),
            (
                "\tfield:;\toffset:1;\tsize:1;",
                Some("no field name in declaration"),
            ),
            (
                "\tfield:char x[;\toffset:1;\tsize:1;",
                Some("no field name in declaration"),
            ),
            (
                "\tfield:int x;\toffset 4;",
                Some("field attribute without `:`"),
            ),
            ("\tfieldless", Some("field attribute without `:`")),
        ] {
            let text = format!("{ok_head}{text}");
            let err = parse_format(&text).unwrap_err();
            match (reason, &err) {
                (None, FormatError::BadId { line: 4, .. }) => {}
                (
                    Some(r),
                    FormatError::BadField {
                        line: 4, reason, ..
                    },
                ) if *reason == r => {}
                _ => panic!("{text:?}: {err:?}"),
            }
            assert!(err.to_string().starts_with("line "), "{err}");
        }
        // Error messages quote at most a bounded part of a huge line.
        let huge = format!(
            "{ok_head}\tfield:int x;offset:{};size:1;",
            "9".repeat(100_000)
        );
        assert!(parse_format(&huge).unwrap_err().to_string().len() < 300);
        // `field:` inside the print format is not a field.
        let text = format!("{ok_head}print fmt: \"field:oops\"\n\tfield:broken\n");
        assert_eq!(parse_format(&text).unwrap().fields, []);
    }

    #[test]
    fn prefixes_and_garbage_do_not_panic() {
        let text = rq_complete_new();
        for (i, _) in text.char_indices() {
            let _ = parse_format(&text[..i]);
        }
        let mut s = 0x1234_5678_9abc_def1u64;
        for _ in 0..2000 {
            let len = (s % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    // Mostly characters that matter to the parser, some arbitrary bytes.
                    match s % 8 {
                        0 => b':',
                        1 => b';',
                        2 => b'\n',
                        3 => b'[',
                        4 => b']',
                        5 => b"fieldoffsetsize"[(s >> 8) as usize % 15],
                        _ => (s >> 16) as u8,
                    }
                })
                .collect();
            let _ = parse_format(&String::from_utf8_lossy(&bytes));
        }
        // Invalid UTF-8 in a name is replaced, not fatal.
        let fmt = parse_format(&String::from_utf8_lossy(b"name: bad\xff\nID: 1\n")).unwrap();
        assert_eq!(fmt.name, "bad\u{fffd}");
    }

    /// A scratch directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "overkvm-tracefs-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_and_reads_a_fake_tracefs() {
        let tmp = TempDir::new("fake");
        let unmounted = tmp.0.join("tracing");
        let debug = tmp.0.join("debug_tracing");
        std::fs::create_dir_all(&unmounted).unwrap();
        let event = debug.join("events/block/block_rq_complete");
        std::fs::create_dir_all(&event).unwrap();
        std::fs::write(event.join("id"), "1432\n").unwrap();
        std::fs::write(event.join("format"), rq_complete_new()).unwrap();

        assert_eq!(find_tracefs_in([unmounted.as_path()]), None);
        assert_eq!(
            find_tracefs_in([unmounted.as_path(), debug.as_path()]),
            Some(debug.clone())
        );
        assert!(event_exists(&debug, "block", "block_rq_complete"));
        assert!(!event_exists(&debug, "block", "block_io_start"));
        assert!(!event_exists(&debug, "..", "block"));
        assert!(!event_exists(&debug, "block/../block", "block_rq_complete"));
        assert!(!event_exists(&debug, "", "block_rq_complete"));

        let fmt = read_format(&debug, "block", "block_rq_complete").unwrap();
        assert_eq!(fmt.field("ioprio").map(|f| f.offset), Some(32));
        let e = read_format(&debug, "block", "nope").unwrap_err();
        assert!(format!("{e:#}").contains("reading"), "{e:#}");
        let e = read_format(&debug, "..", "x").unwrap_err();
        assert!(e.to_string().contains("invalid trace event name"), "{e}");
        std::fs::write(event.join("format"), b"name: x\xff\nformat:\n").unwrap();
        let e = read_format(&debug, "block", "block_rq_complete").unwrap_err();
        assert!(format!("{e:#}").contains("no `ID:` line"), "{e:#}");
    }

    #[test]
    fn real_tracefs_if_mounted() {
        let Some(tracefs) = find_tracefs() else {
            eprintln!("tracefs not mounted; skipped");
            return;
        };
        eprintln!("tracefs at {}", tracefs.display());
        if !event_exists(&tracefs, "block", "block_rq_complete") {
            return;
        }
        match read_format(&tracefs, "block", "block_rq_complete") {
            Ok(fmt) => {
                eprintln!("{fmt:#?}");
                assert_eq!(fmt.name, "block_rq_complete");
                assert!(fmt.field("rwbs").is_some_and(|f| f.size == 8));
            }
            // Unprivileged users may not read format files.
            Err(e) => eprintln!("cannot read block_rq_complete format: {e:#}"),
        }
    }
}
