//! A small reader of the kernel's BTF (BPF Type Format), enough to resolve structure offsets,
//! enumerator values and type names.
//!
//! Rust eBPF programs get no CO-RE relocations, so userspace must find the offsets of the kernel
//! fields they read itself, from `/sys/kernel/btf/vmlinux`. The format is the one described in
//! the kernel's Documentation/bpf/btf.rst. The input is treated as untrusted: every read is
//! bounds-checked, every offset and type id is validated at parse time, and lookups have depth
//! and work limits, so a malformed or hostile blob yields a `BtfError`, never a panic, a stack
//! overflow or an endless loop.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

/// `btf_header.magic` as read in the blob's own byte order.
const MAGIC: u16 = 0xeb9f;
/// The only BTF version that exists.
const VERSION: u8 = 1;
/// Size of `struct btf_header` (magic .. str_len). Later kernels may append fields.
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type` (name_off, info, size/type).
const TYPE_LEN: usize = 12;

/// Anonymous struct/union members nest at most this deep in a lookup (the kernel's own limit
/// for resolving types is 32); deeper means a cycle or a hostile blob.
const MAX_ANON_DEPTH: u32 = 32;
/// Typedef/modifier chains are followed at most this far, so a cycle cannot loop forever.
const MAX_CHAIN: u32 = 64;
/// Members looked at in one `field_offset` call: bounds the work a crafted blob with many
/// self-referencing anonymous members could force (real lookups visit a few hundred).
const MAX_VISITS: u32 = 1 << 20;

/// BTF kinds (`BTF_KIND_*`, bits 24-28 of `btf_type.info`).
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;

    pub fn name(kind: u32) -> &'static str {
        match kind {
            INT => "INT",
            PTR => "PTR",
            ARRAY => "ARRAY",
            STRUCT => "STRUCT",
            UNION => "UNION",
            ENUM => "ENUM",
            FWD => "FWD",
            TYPEDEF => "TYPEDEF",
            VOLATILE => "VOLATILE",
            CONST => "CONST",
            RESTRICT => "RESTRICT",
            FUNC => "FUNC",
            FUNC_PROTO => "FUNC_PROTO",
            VAR => "VAR",
            DATASEC => "DATASEC",
            FLOAT => "FLOAT",
            DECL_TAG => "DECL_TAG",
            TYPE_TAG => "TYPE_TAG",
            ENUM64 => "ENUM64",
            _ => "unknown",
        }
    }

    /// Bytes of kind-specific data after the `btf_type` record, `None` for kinds this reader
    /// does not know (their size cannot be guessed, so parsing cannot continue past them).
    pub fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
        Some(match kind {
            INT | VAR | DECL_TAG => 4,
            ARRAY => 12,
            STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
            ENUM | FUNC_PROTO => 8 * vlen,
            PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
            _ => return None,
        })
    }
}

/// Why a BTF blob could not be read or a lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BtfError {
    /// The file could not be read.
    #[error("cannot read BTF from {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The blob does not start with the BTF magic 0xeB9F in either byte order.
    #[error("not BTF data: magic is {found:#06x}, expected {:#06x}", MAGIC)]
    BadMagic { found: u16 },
    /// A BTF version other than 1.
    #[error("unsupported BTF version {version} (only {} is known)", VERSION)]
    UnsupportedVersion { version: u8 },
    /// The blob ends before something it declares.
    #[error("BTF data is truncated: {0}")]
    Truncated(String),
    /// The blob is inconsistent (bad header length, string offset or type id out of range...).
    #[error("malformed BTF data: {0}")]
    Malformed(String),
    /// A type kind this reader does not know; its size is unknown so parsing must stop.
    #[error(
        "BTF type {id} has kind {kind}, which this reader does not know (kernel newer than overkvm?)"
    )]
    UnknownKind { id: u32, kind: u32 },
    /// No struct or union of that name with members.
    #[error("no struct {name}")]
    TypeNotFound { name: String },
    /// The struct exists but the field path does not resolve.
    #[error("struct {type_name} has no field {path}{}", nothing_named(.path, .missing))]
    FieldNotFound {
        type_name: String,
        path: String,
        /// The path component that was not found, when the path has several.
        missing: String,
    },
    /// A non-final path component is not an embedded struct or union (a pointer, an int...).
    #[error(
        "{type_name}.{path} is not an embedded struct or union, so the path cannot continue through it"
    )]
    NotEmbedded { type_name: String, path: String },
    /// The field is a bitfield that does not start on a byte boundary.
    #[error("{type_name}.{path} is a bitfield at bit offset {bit_offset}, not on a byte boundary")]
    Unaligned {
        type_name: String,
        path: String,
        bit_offset: u64,
    },
    /// The lookup hit a depth or work limit: the types are cyclic or absurdly nested.
    #[error(
        "resolving {type_name}.{path} exceeded the nesting or work limit (cyclic or hostile BTF)"
    )]
    TooComplex { type_name: String, path: String },
    /// The field path is empty or has an empty component.
    #[error("invalid field path {path:?}")]
    BadPath { path: String },
}

/// " (nothing named X)" when the component not found is not the whole path.
fn nothing_named(path: &str, missing: &str) -> String {
    if missing == path {
        String::new()
    } else {
        format!(" (nothing named {missing})")
    }
}

impl BtfError {
    /// True when the error means "this kernel has no such type or field", as opposed to a broken
    /// blob: callers treat optional fields that are absent differently from corruption.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            BtfError::TypeNotFound { .. } | BtfError::FieldNotFound { .. }
        )
    }
}

/// One type record: the fields lookups need plus where its kind-specific data starts (the
/// name is only needed for the index, built at parse).
#[derive(Clone, Copy, Debug)]
struct TypeRec {
    info: u32,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    /// Absolute offset in the blob of the data following the record.
    extra: u32,
    /// Next type id with the same name (0: none), so duplicates cost no allocation.
    next_same_name: u32,
}

impl TypeRec {
    const VOID: TypeRec = TypeRec {
        info: 0,
        size_type: 0,
        extra: 0,
        next_same_name: 0,
    };

    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> u32 {
        self.info & 0xffff
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

/// First and last type id carrying a name.
#[derive(Clone, Copy, Debug)]
struct NameEntry {
    first: u32,
    last: u32,
}

/// A struct/union member found by name, offsets relative to the struct searched.
#[derive(Clone, Copy, Debug)]
struct Member {
    bit_offset: u64,
    type_id: u32,
}

/// Where a blob's sections lie, from its header (checked: magic, version, bounds).
struct Layout {
    big_endian: bool,
    type_start: usize,
    type_len: usize,
    str_start: usize,
    str_len: usize,
}

impl Layout {
    fn of(data: &[u8]) -> Result<Layout, BtfError> {
        let big_endian = match data.get(..2) {
            Some([0x9f, 0xeb]) => false,
            Some([0xeb, 0x9f]) => true,
            Some(&[a, b]) => {
                return Err(BtfError::BadMagic {
                    found: u16::from_le_bytes([a, b]),
                });
            }
            _ => {
                return Err(BtfError::Truncated(format!(
                    "{} bytes, not even a magic number",
                    data.len()
                )));
            }
        };
        if data.len() < HEADER_LEN {
            return Err(BtfError::Truncated(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                data.len()
            )));
        }
        // Record positions are kept as u32 (vmlinux BTF is a few MB).
        if u32::try_from(data.len()).is_err() {
            return Err(BtfError::Malformed(format!(
                "{} bytes is more than BTF can describe",
                data.len()
            )));
        }
        let version = data[2];
        if version != VERSION {
            return Err(BtfError::UnsupportedVersion { version });
        }
        // The header is complete here, so these reads succeed; unwrap_or keeps it panic-free.
        let hdr = |i: usize| read_u32(data, 4 + 4 * i, big_endian).unwrap_or(0) as u64;
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (hdr(0), hdr(1), hdr(2), hdr(3), hdr(4));
        if hdr_len < HEADER_LEN as u64 {
            return Err(BtfError::Malformed(format!(
                "header length {hdr_len} is shorter than {HEADER_LEN}"
            )));
        }
        let blob_len = data.len() as u64;
        let section = |name: &str, off: u64, len: u64| -> Result<(usize, usize), BtfError> {
            // u64 sums of u32 values cannot overflow.
            let start = hdr_len + off;
            if start + len > blob_len {
                return Err(BtfError::Truncated(format!(
                    "{name} section at {start}..{} lies beyond the {blob_len}-byte blob",
                    start + len
                )));
            }
            Ok((start as usize, len as usize))
        };
        let (type_start, type_len) = section("type", type_off, type_len)?;
        let (str_start, str_len) = section("string", str_off, str_len)?;
        // A final NUL means every in-range offset has a terminator: checking `off < str_len`
        // is then enough for names.
        if data[str_start..str_start + str_len]
            .last()
            .is_some_and(|&b| b != 0)
        {
            return Err(BtfError::Malformed(
                "the string section does not end with a NUL byte".to_string(),
            ));
        }
        Ok(Layout {
            big_endian,
            type_start,
            type_len,
            str_start,
            str_len,
        })
    }
}

/// The string section while types are indexed: names checked and read.
struct Names<'a> {
    strs: &'a [u8],
}

impl Names<'_> {
    fn beyond(&self, off: u32, what: &dyn Fn() -> String) -> BtfError {
        BtfError::Malformed(format!(
            "{} has name offset {off}, beyond the {}-byte string section",
            what(),
            self.strs.len()
        ))
    }

    fn read(&self, off: u32, what: &dyn Fn() -> String) -> Result<&[u8], BtfError> {
        read_str(self.strs, off).ok_or_else(|| self.beyond(off, what))
    }

    /// Member and parameter names are only read at lookup: checking the range suffices.
    fn check(&self, off: u32, what: &dyn Fn() -> String) -> Result<(), BtfError> {
        if off == 0 || (off as usize) < self.strs.len() {
            Ok(())
        } else {
            Err(self.beyond(off, what))
        }
    }
}

/// What [`Btf`] keeps of the type records, built one record at a time.
struct Index {
    types: Vec<TypeRec>,
    by_name: HashMap<Box<str>, NameEntry>,
    enumerators: HashMap<Box<str>, i64>,
    /// Types may refer to later ids, so references are checked once all are counted:
    /// (highest referenced id, the id referring to it).
    max_ref: (u32, u32),
}

impl Index {
    fn sized_for(type_len: usize) -> Index {
        let mut types = Vec::with_capacity(type_len / 16 + 1);
        types.push(TypeRec::VOID);
        // Sized for vmlinux's proportions (about half the types named, one enumerator per
        // six types) so the maps are not rehashed over and over while filling.
        Index {
            types,
            by_name: HashMap::with_capacity(type_len / 64),
            enumerators: HashMap::with_capacity(type_len / 256),
            max_ref: (0, 0),
        }
    }

    /// Reads the record at `pos` (its trailing data included), indexes it and returns where
    /// the next one starts.
    fn add_record(
        &mut self,
        word: &dyn Fn(usize) -> u32,
        names: &Names,
        pos: usize,
        type_end: usize,
    ) -> Result<usize, BtfError> {
        // At most type_len / 12 + 1 records, and type_len fits in u32.
        let id = self.types.len() as u32;
        if type_end - pos < TYPE_LEN {
            return Err(BtfError::Truncated(format!(
                "type {id} starts {} bytes before the end of the type section, needs \
                 {TYPE_LEN}",
                type_end - pos
            )));
        }
        let extra = pos + TYPE_LEN;
        let rec = TypeRec {
            info: word(pos + 4),
            size_type: word(pos + 8),
            extra: extra as u32,
            next_same_name: 0,
        };
        let k = rec.kind();
        let vlen = rec.vlen() as usize;
        let trailing = kind::trailing_len(k, vlen).ok_or(BtfError::UnknownKind { id, kind: k })?;
        if type_end - extra < trailing {
            return Err(BtfError::Truncated(format!(
                "type {id} ({}) with vlen {vlen} needs {trailing} more bytes, only {} remain \
                 in the type section",
                kind::name(k),
                type_end - extra
            )));
        }
        self.visit_trailing(word, names, &rec, id)?;
        let name = names.read(word(pos), &|| format!("type {id}"))?;
        self.index_name(name, id);
        self.types.push(rec);
        Ok(extra + trailing)
    }

    fn refer(&mut self, to: u32, from: u32) {
        if to > self.max_ref.0 {
            self.max_ref = (to, from);
        }
    }

    /// The record's trailing data: the ids it refers to, the names of members and
    /// parameters (range-checked), and enumerators (recorded).
    fn visit_trailing(
        &mut self,
        word: &dyn Fn(usize) -> u32,
        names: &Names,
        rec: &TypeRec,
        id: u32,
    ) -> Result<(), BtfError> {
        let (k, vlen, extra) = (rec.kind(), rec.vlen() as usize, rec.extra as usize);
        match k {
            kind::PTR
            | kind::TYPEDEF
            | kind::VOLATILE
            | kind::CONST
            | kind::RESTRICT
            | kind::FUNC
            | kind::VAR
            | kind::DECL_TAG
            | kind::TYPE_TAG => self.refer(rec.size_type, id),
            kind::ARRAY => {
                self.refer(word(extra), id);
                self.refer(word(extra + 4), id);
            }
            kind::STRUCT | kind::UNION => {
                for j in 0..vlen {
                    let m = extra + 12 * j;
                    names.check(word(m), &|| format!("member {j} of type {id}"))?;
                    self.refer(word(m + 4), id);
                }
            }
            kind::FUNC_PROTO => {
                self.refer(rec.size_type, id);
                for j in 0..vlen {
                    let p = extra + 8 * j;
                    names.check(word(p), &|| format!("parameter {j} of type {id}"))?;
                    self.refer(word(p + 4), id);
                }
            }
            kind::DATASEC => {
                for j in 0..vlen {
                    self.refer(word(extra + 12 * j), id);
                }
            }
            kind::ENUM | kind::ENUM64 => self.add_enumerators(word, names, rec, id)?,
            _ => {}
        }
        Ok(())
    }

    /// An enum's enumerators by name (the first of a name wins).
    fn add_enumerators(
        &mut self,
        word: &dyn Fn(usize) -> u32,
        names: &Names,
        rec: &TypeRec,
        id: u32,
    ) -> Result<(), BtfError> {
        let k = rec.kind();
        let step = if k == kind::ENUM { 8 } else { 12 };
        for j in 0..rec.vlen() as usize {
            let e = rec.extra as usize + step * j;
            let name = names.read(word(e), &|| format!("enumerator {j} of type {id}"))?;
            let value = if k == kind::ENUM {
                let raw = word(e + 4);
                // kind_flag marks a signed enum (Linux 6.0+); without it the value is unsigned.
                if rec.kind_flag() {
                    raw as i32 as i64
                } else {
                    raw as i64
                }
            } else {
                (((word(e + 8) as u64) << 32) | word(e + 4) as u64) as i64
            };
            if let Ok(name) = std::str::from_utf8(name)
                && !name.is_empty()
                && !self.enumerators.contains_key(name)
            {
                self.enumerators.insert(name.into(), value);
            }
        }
        Ok(())
    }

    /// Chains type `id` to the others of its name. Names that are not UTF-8 can never match a
    /// `&str` query: not indexed.
    fn index_name(&mut self, name: &[u8], id: u32) {
        let Ok(name) = std::str::from_utf8(name) else {
            return;
        };
        if name.is_empty() {
            return;
        }
        match self.by_name.get_mut(name) {
            Some(entry) => {
                if let Some(prev) = self.types.get_mut(entry.last as usize) {
                    prev.next_same_name = id;
                }
                entry.last = id;
            }
            None => {
                self.by_name.insert(
                    name.into(),
                    NameEntry {
                        first: id,
                        last: id,
                    },
                );
            }
        }
    }

    fn check_references(&self) -> Result<(), BtfError> {
        if self.max_ref.0 as usize >= self.types.len() {
            return Err(BtfError::Malformed(format!(
                "type {} refers to type id {}, but there are only {} types",
                self.max_ref.1,
                self.max_ref.0,
                self.types.len() - 1
            )));
        }
        Ok(())
    }
}

/// A parsed BTF blob with a name index, for offset, enumerator and type-name lookups.
pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    str_start: usize,
    str_len: usize,
    /// Indexed by type id; id 0 is `void`.
    types: Vec<TypeRec>,
    by_name: HashMap<Box<str>, NameEntry>,
    /// Enumerator name -> value, first definition wins.
    enumerators: HashMap<Box<str>, i64>,
    /// Where the blob came from, for error messages.
    source: String,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("source", &self.source)
            .field("bytes", &self.data.len())
            .field("types", &self.type_count())
            .field("big_endian", &self.big_endian)
            .finish()
    }
}

/// Reads a u32 at `off` in the given byte order, `None` past the end.
fn read_u32(data: &[u8], off: usize, big_endian: bool) -> Option<u32> {
    let b: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    })
}

/// The NUL-terminated string at `off` in the string section, `None` if out of range.
fn read_str(strs: &[u8], off: u32) -> Option<&[u8]> {
    if off == 0 {
        return Some(b"");
    }
    let rest = strs.get(off as usize..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

impl Btf {
    /// Where the running kernel exposes its own BTF (CONFIG_DEBUG_INFO_BTF).
    pub const SYSFS_PATH: &str = "/sys/kernel/btf/vmlinux";

    /// Reads and parses the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_file(Path::new(Self::SYSFS_PATH))
    }

    /// Reads and parses a BTF file (a vmlinux BTF dump, for example).
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_owned(data, path.display().to_string())
    }

    /// Parses a BTF blob held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        Self::parse_owned(bytes.to_vec(), "<memory>".to_string())
    }

    /// Where the BTF came from (a path, or `<memory>`), for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Number of types, not counting `void`.
    pub fn type_count(&self) -> usize {
        self.types.len() - 1
    }

    fn parse_owned(data: Vec<u8>, source: String) -> Result<Btf, BtfError> {
        let layout = Layout::of(&data)?;
        let names = Names {
            strs: &data[layout.str_start..layout.str_start + layout.str_len],
        };
        let mut ix = Index::sized_for(layout.type_len);
        let big_endian = layout.big_endian;
        let word = |off: usize| read_u32(&data, off, big_endian).unwrap_or(0);
        let type_end = layout.type_start + layout.type_len;
        let mut pos = layout.type_start;
        while pos < type_end {
            pos = ix.add_record(&word, &names, pos, type_end)?;
        }
        ix.check_references()?;
        let Index {
            types,
            by_name,
            enumerators,
            ..
        } = ix;
        Ok(Btf {
            big_endian,
            str_start: layout.str_start,
            str_len: layout.str_len,
            types,
            by_name,
            enumerators,
            source,
            data,
        })
    }

    fn word(&self, off: usize) -> Option<u32> {
        read_u32(&self.data, off, self.big_endian)
    }

    fn name_of(&self, name_off: u32) -> Option<&[u8]> {
        read_str(
            &self.data[self.str_start..self.str_start + self.str_len],
            name_off,
        )
    }

    fn ty(&self, id: u32) -> Option<&TypeRec> {
        self.types.get(id as usize)
    }

    /// Type ids named `name`, in id order.
    fn ids_named<'a>(&'a self, name: &str) -> impl Iterator<Item = u32> + 'a {
        let mut next = self.by_name.get(name).map_or(0, |e| e.first);
        std::iter::from_fn(move || {
            if next == 0 {
                return None;
            }
            let id = next;
            next = self.ty(id).map_or(0, |t| t.next_same_name);
            Some(id)
        })
    }

    /// True if a type of that name exists (any kind), e.g. typedef "btf_trace_block_io_start".
    pub fn has_type(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Value of an enumerator (ENUM or ENUM64) by enumerator name, e.g. "REQ_OP_WRITE",
    /// "__REQ_PREFLUSH". Unsigned 64-bit values above `i64::MAX` come back wrapped.
    pub fn enum_value(&self, enumerator: &str) -> Option<i64> {
        self.enumerators.get(enumerator).copied()
    }

    /// Byte offset of a field in a struct/union named `type_name`, following a dotted path
    /// through embedded (non-pointer) struct members, e.g. ("bio", "bi_iter.bi_size"),
    /// ("blkcg", "css.cgroup").
    ///
    /// Members of anonymous struct/union members are found as if they were direct members
    /// (recursively), as C code names them. If several types share the name, the first
    /// STRUCT/UNION with members is used, skipping forward declarations. A bitfield that does
    /// not start on a byte boundary is an error: the programs read whole bytes.
    pub fn field_offset(&self, type_name: &str, path: &str) -> Result<u32, BtfError> {
        let comps: Vec<&str> = path.split('.').collect();
        if comps.iter().any(|c| c.is_empty()) {
            return Err(BtfError::BadPath {
                path: path.to_string(),
            });
        }
        let root = self
            .ids_named(type_name)
            .find(|&id| {
                self.ty(id)
                    .is_some_and(|t| matches!(t.kind(), kind::STRUCT | kind::UNION) && t.vlen() > 0)
            })
            .ok_or_else(|| BtfError::TypeNotFound {
                name: type_name.to_string(),
            })?;
        let too_complex = || BtfError::TooComplex {
            type_name: type_name.to_string(),
            path: path.to_string(),
        };
        let mut visits = 0u32;
        let mut current = root;
        let mut bits = 0u64;
        for (i, comp) in comps.iter().enumerate() {
            let member = self
                .find_member(current, comp, 0, &mut visits)
                .ok_or_else(too_complex)?
                .ok_or_else(|| BtfError::FieldNotFound {
                    type_name: type_name.to_string(),
                    path: path.to_string(),
                    missing: comp.to_string(),
                })?;
            bits += member.bit_offset;
            if i + 1 < comps.len() {
                current = self
                    .resolve_composite(member.type_id)
                    .ok_or_else(too_complex)?
                    .ok_or_else(|| BtfError::NotEmbedded {
                        type_name: type_name.to_string(),
                        path: comps[..=i].join("."),
                    })?;
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Unaligned {
                type_name: type_name.to_string(),
                path: path.to_string(),
                bit_offset: bits,
            });
        }
        u32::try_from(bits / 8).map_err(|_| {
            BtfError::Malformed(format!(
                "{type_name}.{path} is at bit offset {bits}, beyond 4 GiB"
            ))
        })
    }

    /// Follows typedefs and qualifiers from `id`: `Some(Some(id))` for a struct or union,
    /// `Some(None)` for anything else, `None` when the chain is too long (a cycle).
    fn resolve_composite(&self, mut id: u32) -> Option<Option<u32>> {
        for _ in 0..MAX_CHAIN {
            let Some(t) = self.ty(id) else {
                return Some(None);
            };
            match t.kind() {
                kind::STRUCT | kind::UNION => return Some(Some(id)),
                kind::TYPEDEF | kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_type
                }
                _ => return Some(None),
            }
        }
        None
    }

    /// Finds member `name` of struct/union `id`, looking into anonymous members. The outer
    /// `None` means a limit was hit.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: u32,
        visits: &mut u32,
    ) -> Option<Option<Member>> {
        if depth > MAX_ANON_DEPTH {
            return None;
        }
        let Some(t) = self.ty(id) else {
            return Some(None);
        };
        let kind_flag = t.kind_flag();
        for j in 0..t.vlen() as usize {
            *visits += 1;
            if *visits > MAX_VISITS {
                return None;
            }
            let m = t.extra as usize + 12 * j;
            // Validated at parse; a failed read just ends the search.
            let (Some(name_off), Some(type_id), Some(offset)) =
                (self.word(m), self.word(m + 4), self.word(m + 8))
            else {
                return Some(None);
            };
            // With kind_flag, the low 24 bits are the bit offset and the high 8 the bitfield
            // size; without it, the whole word is the bit offset.
            let mut bit_offset = if kind_flag {
                (offset & 0xff_ffff) as u64
            } else {
                offset as u64
            };
            let member_name = self.name_of(name_off).unwrap_or_default();
            if member_name == name.as_bytes() {
                // Old-style bitfields put an extra bit offset in the INT encoding.
                if !kind_flag
                    && let Some(int) = self.ty(type_id)
                    && int.kind() == kind::INT
                    && let Some(enc) = self.word(int.extra as usize)
                {
                    bit_offset += ((enc >> 16) & 0xff) as u64;
                }
                return Some(Some(Member {
                    bit_offset,
                    type_id,
                }));
            }
            if member_name.is_empty()
                && let Some(inner) = self.resolve_composite(type_id)?
                && let Some(found) = self.find_member(inner, name, depth + 1, visits)?
            {
                return Some(Some(Member {
                    bit_offset: bit_offset + found.bit_offset,
                    type_id: found.type_id,
                }));
            }
        }
        Some(None)
    }
}

/// Builds BTF blobs for tests (here and in `layout`).
#[cfg(test)]
pub(crate) mod test_builder {
    use super::kind;

    /// Appends types and strings; ids start at 1 in insertion order.
    pub struct Builder {
        words: Vec<u32>,
        strs: Vec<u8>,
        next_id: u32,
    }

    /// A struct member: name, type id, bit offset, bitfield size (0: not a bitfield).
    pub type M<'a> = (&'a str, u32, u32, u32);

    impl Builder {
        pub fn new() -> Builder {
            Builder {
                words: Vec::new(),
                strs: vec![0],
                next_id: 1,
            }
        }

        pub fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(name.as_bytes());
            self.strs.push(0);
            off
        }

        /// A raw type record; returns its id.
        pub fn raw(&mut self, name: &str, k: u32, kflag: bool, vlen: u32, st: u32) -> u32 {
            let n = self.s(name);
            self.words
                .extend([n, (kflag as u32) << 31 | k << 24 | vlen, st]);
            self.next_id += 1;
            self.next_id - 1
        }

        pub fn w(&mut self, words: &[u32]) {
            self.words.extend_from_slice(words);
        }

        pub fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.raw(name, kind::INT, false, 0, size);
            self.w(&[size * 8]);
            id
        }

        pub fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", kind::PTR, false, 0, to)
        }

        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, kind::TYPEDEF, false, 0, to)
        }

        pub fn fwd(&mut self, name: &str) -> u32 {
            self.raw(name, kind::FWD, false, 0, 0)
        }

        /// Struct (or union) whose members give bit offsets; uses kind_flag encoding when any
        /// member is a bitfield.
        pub fn composite(&mut self, union: bool, name: &str, size: u32, members: &[M]) -> u32 {
            let kflag = members.iter().any(|m| m.3 != 0);
            let k = if union { kind::UNION } else { kind::STRUCT };
            let id = self.raw(name, k, kflag, members.len() as u32, size);
            for &(mname, ty, bit, bits) in members {
                let n = self.s(mname);
                let off = if kflag { bits << 24 | bit } else { bit };
                self.w(&[n, ty, off]);
            }
            id
        }

        pub fn strukt(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(false, name, size, members)
        }

        pub fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(true, name, size, members)
        }

        pub fn enum32(&mut self, name: &str, signed: bool, values: &[(&str, i32)]) -> u32 {
            let id = self.raw(name, kind::ENUM, signed, values.len() as u32, 4);
            for &(n, v) in values {
                let n = self.s(n);
                self.w(&[n, v as u32]);
            }
            id
        }

        pub fn enum64(&mut self, name: &str, signed: bool, values: &[(&str, u64)]) -> u32 {
            let id = self.raw(name, kind::ENUM64, signed, values.len() as u32, 8);
            for &(n, v) in values {
                let n = self.s(n);
                self.w(&[n, v as u32, (v >> 32) as u32]);
            }
            id
        }

        /// The blob in little (or big) endian byte order.
        pub fn build_endian(&self, big: bool) -> Vec<u8> {
            let w32 = |v: u32| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            let type_len = self.words.len() as u32 * 4;
            let mut out = Vec::new();
            out.extend(if big {
                0xeb9fu16.to_be_bytes()
            } else {
                0xeb9fu16.to_le_bytes()
            });
            out.extend([1, 0]);
            for v in [24, 0, type_len, type_len, self.strs.len() as u32] {
                out.extend(w32(v));
            }
            for &v in &self.words {
                out.extend(w32(v));
            }
            out.extend(&self.strs);
            out
        }

        pub fn build(&self) -> Vec<u8> {
            self.build_endian(false)
        }
    }

    /// A miniature of the kernel types overkvm reads, shaped like Linux 6.x.
    pub fn kernel_like(with_blkg: bool, with_cmd_flags: bool) -> Vec<u8> {
        let mut b = Builder::new();
        let u32t = b.int("unsigned int", 4); // 1
        let u64t = b.int("long long unsigned int", 8); // 2
        let u16t = b.int("short unsigned int", 2); // 3
        let voidp = b.ptr(0); // 4
        b.fwd("request"); // 5: a forward declaration that must be skipped
        b.strukt("request", 0, &[]); // 6: an empty declaration that must be skipped too
        let bdev = b.strukt(
            "block_device",
            64,
            &[("bd_start_sect", u64t, 0, 0), ("bd_dev", u32t, 128 + 32, 0)],
        );
        let bdev_p = b.ptr(bdev);
        let mut rq_members: Vec<M> = vec![
            ("q", voidp, 0, 0),
            ("mq_ctx", voidp, 64, 0),
            ("mq_hctx", voidp, 128, 0),
            ("rq_flags", u32t, 224, 0),
            ("__data_len", u32t, 352, 0),
            ("bio", voidp, 448, 0),
            ("part", bdev_p, 704, 0),
        ];
        if with_cmd_flags {
            rq_members.push(("cmd_flags", u32t, 192, 0));
        }
        b.strukt("request", 300, &rq_members);
        let iter = b.strukt(
            "bvec_iter",
            20,
            &[
                ("bi_sector", u64t, 0, 0),
                ("bi_size", u32t, 64, 0),
                ("bi_idx", u32t, 96, 0),
                ("bi_bvec_done", u32t, 128, 0),
            ],
        );
        let iter_td = b.typedef("bvec_iter_t", iter);
        let mut bio_members: Vec<M> = vec![
            ("bi_next", voidp, 0, 0),
            ("bi_bdev", bdev_p, 64, 0),
            ("bi_opf", u32t, 128, 0),
            ("bi_flags", u16t, 160, 0),
            ("bi_iter", iter_td, 256, 0),
        ];
        if with_blkg {
            bio_members.push(("bi_blkg", voidp, 512, 0));
        }
        b.strukt("bio", 128, &bio_members);
        let cgroup = b.strukt(
            "cgroup",
            1024,
            &[("self", u64t, 0, 0), ("kn", voidp, 2304, 0)],
        );
        let cgroup_p = b.ptr(cgroup);
        let css = b.strukt(
            "cgroup_subsys_state",
            200,
            &[("cgroup", cgroup_p, 0, 0), ("ss", voidp, 64, 0)],
        );
        let blkcg = b.strukt("blkcg", 400, &[("css", css, 0, 0)]);
        let blkcg_p = b.ptr(blkcg);
        b.strukt(
            "blkcg_gq",
            200,
            &[("q", voidp, 0, 0), ("blkcg", blkcg_p, 320, 0)],
        );
        // kernfs_node.id lives in an anonymous union here, to exercise that path.
        let anon = b.union("", 8, &[("id", u64t, 0, 0), ("ino", u32t, 0, 0)]);
        b.strukt(
            "kernfs_node",
            128,
            &[("count", u32t, 0, 0), ("", anon, 64 * 7, 0)],
        );
        b.enum32(
            "req_op",
            false,
            &[
                ("REQ_OP_READ", 0),
                ("REQ_OP_WRITE", 1),
                ("REQ_OP_FLUSH", 2),
                ("REQ_OP_DISCARD", 3),
                ("REQ_OP_SECURE_ERASE", 5),
                ("REQ_OP_WRITE_ZEROES", 9),
            ],
        );
        b.enum32(
            "req_flag_bits",
            false,
            &[
                ("__REQ_FAILFAST_DEV", 8),
                ("__REQ_FUA", 17),
                ("__REQ_PREFLUSH", 18),
            ],
        );
        let proto = b.raw("", kind::FUNC_PROTO, false, 1, 0);
        let n = b.s("__data");
        b.w(&[n, voidp]);
        let proto_p = b.ptr(proto);
        for name in [
            "btf_trace_block_io_start",
            "btf_trace_block_io_done",
            "btf_trace_block_rq_issue",
            "btf_trace_block_rq_requeue",
            "btf_trace_block_bio_queue",
        ] {
            b.typedef(name, proto_p);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::test_builder::{Builder, M, kernel_like};
    use super::*;

    /// A blob with every kind, anonymous unions, nested structs, bitfields and enums.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let u32t = b.int("unsigned int", 4); // 1
        let u64t = b.int("long long unsigned int", 8); // 2
        let u8t = b.int("unsigned char", 1); // 3
        let p = b.ptr(u32t); // 4
        // Every other kind, so the parser must step over each one correctly.
        b.raw("arr", kind::ARRAY, false, 0, 0); // 5
        b.w(&[u8t, u32t, 16]);
        b.fwd("inner"); // 6
        b.raw("", kind::VOLATILE, false, 0, u32t); // 7
        let c = b.raw("", kind::CONST, false, 0, 9); // 8 -> typedef 9 (forward reference)
        let td = b.typedef("inner_t", 10); // 9 -> struct 10
        b.strukt("inner", 16, &[("a", u32t, 0, 0), ("b", u64t, 64, 0)]); // 10
        b.raw("", kind::RESTRICT, false, 0, p); // 11
        let proto = b.raw("", kind::FUNC_PROTO, false, 2, u32t); // 12
        let (n1, n2) = (b.s("x"), b.s(""));
        b.w(&[n1, u32t, n2, 0]);
        b.raw("some_func", kind::FUNC, false, 1, proto); // 13
        let var = b.raw("some_var", kind::VAR, false, 0, u32t); // 14
        b.w(&[1]);
        b.raw(".data", kind::DATASEC, false, 1, 4); // 15
        b.w(&[var, 0, 4]);
        b.raw("double", kind::FLOAT, false, 0, 8); // 16
        b.raw("tag", kind::DECL_TAG, false, 0, var); // 17
        b.w(&[u32::MAX]);
        b.raw("user", kind::TYPE_TAG, false, 0, p); // 18
        let anon_s = b.strukt("", 8, &[("deep", u32t, 32, 0)]); // 19
        let anon_u = b.union(
            "",
            8,
            &[("alias", u64t, 0, 0), ("", anon_s, 0, 0), ("", c, 0, 0)],
        ); // 20
        let bits: [M; 4] = [
            ("flag", u8t, 0, 1),
            ("odd", u8t, 3, 4),
            ("byte_bits", u8t, 8, 3),
            ("plain", u32t, 32, 0),
        ];
        let bf = b.strukt("", 8, &bits); // 21
        b.strukt(
            "outer",
            64,
            &[
                ("first", u32t, 0, 0),
                ("nested", td, 64, 0),
                ("", anon_u, 192, 0),
                ("ptr", p, 320, 0),
                ("", bf, 384, 0),
                ("const_nested", c, 448, 0),
            ],
        );
        b.union("un", 8, &[("x", u32t, 0, 0), ("y", u64t, 0, 0)]);
        b.enum32("e", false, &[("E_ZERO", 0), ("E_BIG", -1), ("DUP", 7)]);
        b.enum32("es", true, &[("ES_NEG", -5), ("DUP", 8)]);
        b.enum64("e64", false, &[("E64_BIG", 1 << 40), ("E64_MAX", u64::MAX)]);
        b.enum64("e64s", true, &[("E64_NEG", (-3i64) as u64)]);
        b.build()
    }

    #[test]
    fn finds_direct_nested_and_anonymous_fields() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field_offset("outer", "first").unwrap(), 0);
        assert_eq!(btf.field_offset("outer", "nested").unwrap(), 8);
        // Through a typedef to a struct.
        assert_eq!(btf.field_offset("outer", "nested.b").unwrap(), 16);
        // Through const -> typedef -> struct.
        assert_eq!(btf.field_offset("outer", "const_nested.b").unwrap(), 56 + 8);
        // Anonymous union, then an anonymous struct inside it.
        assert_eq!(btf.field_offset("outer", "alias").unwrap(), 24);
        assert_eq!(btf.field_offset("outer", "deep").unwrap(), 28);
        // Anonymous const member inside the anonymous union: its fields are reachable too.
        assert_eq!(btf.field_offset("outer", "a").unwrap(), 24);
        assert_eq!(btf.field_offset("outer", "ptr").unwrap(), 40);
        assert_eq!(btf.field_offset("un", "y").unwrap(), 0);
        assert_eq!(btf.field_offset("inner", "b").unwrap(), 8);
    }

    #[test]
    fn bitfields_must_be_byte_aligned() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field_offset("outer", "flag").unwrap(), 48);
        assert_eq!(btf.field_offset("outer", "byte_bits").unwrap(), 49);
        assert_eq!(btf.field_offset("outer", "plain").unwrap(), 52);
        let err = btf.field_offset("outer", "odd").unwrap_err();
        assert!(
            matches!(
                err,
                BtfError::Unaligned {
                    bit_offset: 387,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("bit offset 387"), "{err}");
    }

    #[test]
    fn old_style_int_bitfield_offset_is_added() {
        let mut b = Builder::new();
        let bf = b.raw("", kind::INT, false, 0, 4);
        b.w(&[3 << 16 | 5]); // 5 bits at int bit offset 3
        let bf8 = b.raw("", kind::INT, false, 0, 4);
        b.w(&[8 << 16 | 8]);
        b.strukt("s", 8, &[("f", bf, 32, 0), ("g", bf8, 32, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(matches!(
            btf.field_offset("s", "f"),
            Err(BtfError::Unaligned { bit_offset: 35, .. })
        ));
        assert_eq!(btf.field_offset("s", "g").unwrap(), 5);
    }

    #[test]
    fn lookup_errors_are_typed_and_clear() {
        let btf = Btf::parse(&sample()).unwrap();
        let e = btf.field_offset("outer", "nope").unwrap_err();
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "struct outer has no field nope");
        let e = btf.field_offset("outer", "nested.zz").unwrap_err();
        assert!(e.is_not_found());
        assert_eq!(
            e.to_string(),
            "struct outer has no field nested.zz (nothing named zz)"
        );
        let e = btf.field_offset("missing", "x").unwrap_err();
        assert!(matches!(e, BtfError::TypeNotFound { .. }), "{e}");
        // A forward declaration alone does not count as the struct.
        let mut b = Builder::new();
        b.fwd("only_fwd");
        b.strukt("only_fwd", 0, &[]);
        let fwd = Btf::parse(&b.build()).unwrap();
        assert!(matches!(
            fwd.field_offset("only_fwd", "x"),
            Err(BtfError::TypeNotFound { .. })
        ));
        // Pointers are not followed.
        let e = btf.field_offset("outer", "ptr.x").unwrap_err();
        assert!(matches!(e, BtfError::NotEmbedded { .. }), "{e}");
        assert!(!e.is_not_found());
        for bad in ["", ".", "first.", ".first", "a..b"] {
            assert!(
                matches!(
                    btf.field_offset("outer", bad),
                    Err(BtfError::BadPath { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn enumerators_and_names() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.enum_value("E_ZERO"), Some(0));
        // Unsigned 32-bit enum: 0xffffffff, not -1.
        assert_eq!(btf.enum_value("E_BIG"), Some(0xffff_ffff));
        assert_eq!(btf.enum_value("ES_NEG"), Some(-5));
        assert_eq!(btf.enum_value("DUP"), Some(7), "first definition wins");
        assert_eq!(btf.enum_value("E64_BIG"), Some(1 << 40));
        assert_eq!(btf.enum_value("E64_MAX"), Some(-1));
        assert_eq!(btf.enum_value("E64_NEG"), Some(-3));
        assert_eq!(btf.enum_value("nope"), None);
        assert_eq!(btf.enum_value(""), None);
        for name in [
            "outer",
            "inner_t",
            "some_func",
            "some_var",
            ".data",
            "double",
            "tag",
        ] {
            assert!(btf.has_type(name), "{name}");
        }
        assert!(!btf.has_type(""));
        assert!(!btf.has_type("first"));
        assert_eq!(btf.type_count(), 27);
    }

    #[test]
    fn big_endian_blobs_parse_the_same() {
        let mut b = Builder::new();
        let u32t = b.int("unsigned int", 4);
        b.strukt("s", 8, &[("a", u32t, 0, 0), ("b", u32t, 32, 0)]);
        b.enum32("e", false, &[("V", 42)]);
        let btf = Btf::parse(&b.build_endian(true)).unwrap();
        assert_eq!(btf.field_offset("s", "b").unwrap(), 4);
        assert_eq!(btf.enum_value("V"), Some(42));
    }

    #[test]
    fn kernel_like_blob_resolves() {
        let btf = Btf::parse(&kernel_like(true, true)).unwrap();
        assert_eq!(btf.field_offset("request", "cmd_flags").unwrap(), 24);
        assert_eq!(btf.field_offset("bio", "bi_iter.bi_size").unwrap(), 40);
        assert_eq!(btf.field_offset("blkcg", "css.cgroup").unwrap(), 0);
        assert_eq!(btf.field_offset("kernfs_node", "id").unwrap(), 56);
    }

    /// Header fields as (hdr_len, type_off, type_len, str_off, str_len), little endian.
    fn with_header(blob: &[u8], fields: [u32; 5]) -> Vec<u8> {
        let mut out = blob.to_vec();
        for (i, v) in fields.iter().enumerate() {
            out[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn header(blob: &[u8]) -> [u32; 5] {
        std::array::from_fn(|i| read_u32(blob, 4 + 4 * i, false).unwrap())
    }

    /// Runs every query on whatever parsed, to prove lookups on odd data do not panic either.
    fn exercise(btf: &Btf) {
        for (t, p) in [
            ("outer", "deep"),
            ("outer", "nested.b"),
            ("outer", "odd"),
            ("request", "cmd_flags"),
            ("bio", "bi_iter.bi_size"),
            ("kernfs_node", "id"),
        ] {
            let _ = btf.field_offset(t, p);
        }
        let _ = btf.enum_value("E64_BIG");
        let _ = btf.has_type("outer");
    }

    #[test]
    fn every_prefix_is_rejected_without_panic() {
        for blob in [sample(), kernel_like(true, true)] {
            for len in 0..blob.len() {
                assert!(Btf::parse(&blob[..len]).is_err(), "prefix {len}");
            }
            assert!(Btf::parse(&blob).is_ok());
        }
    }

    #[test]
    fn truncated_type_sections_do_not_panic() {
        // Shrink the declared type section to every length, keeping the header consistent,
        // so records and trailing data are cut at every possible byte.
        let blob = sample();
        let [hl, to, tl, so, sl] = header(&blob);
        for cut in 0..tl {
            if let Ok(btf) = Btf::parse(&with_header(&blob, [hl, to, cut, so, sl])) {
                exercise(&btf);
            }
        }
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let blob = sample();
        let [hl, to, tl, so, sl] = header(&blob);
        let cases: [(&str, Vec<u8>); 9] = [
            ("bad magic", {
                let mut b = blob.clone();
                b[0] = 0;
                b
            }),
            ("version", {
                let mut b = blob.clone();
                b[2] = 2;
                b
            }),
            ("hdr_len small", with_header(&blob, [4, to, tl, so, sl])),
            (
                "hdr_len huge",
                with_header(&blob, [u32::MAX, to, tl, so, sl]),
            ),
            (
                "type_off huge",
                with_header(&blob, [hl, u32::MAX, tl, so, sl]),
            ),
            (
                "type_len huge",
                with_header(&blob, [hl, to, u32::MAX, so, sl]),
            ),
            (
                "str_len huge",
                with_header(&blob, [hl, to, tl, so, u32::MAX]),
            ),
            ("strings cut", with_header(&blob, [hl, to, tl, so, sl - 1])),
            ("empty", Vec::new()),
        ];
        for (what, b) in cases {
            let e = Btf::parse(&b).unwrap_err();
            assert!(!e.to_string().is_empty(), "{what}");
        }
    }

    #[test]
    fn hostile_records_are_rejected() {
        // vlen pointing beyond the end.
        let mut b = Builder::new();
        let u32t = b.int("int", 4);
        b.raw("s", kind::STRUCT, false, 1000, 8);
        b.w(&[0, u32t, 0, 0, u32t, 32]);
        let e = Btf::parse(&b.build()).unwrap_err();
        assert!(matches!(e, BtfError::Truncated(_)), "{e}");
        assert!(e.to_string().contains("vlen 1000"), "{e}");

        // Type name offset out of range.
        let mut b = Builder::new();
        b.int("int", 4);
        b.w(&[1_000_000, kind::PTR << 24, 1]);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Malformed(_))
        ));

        // Member name offset out of range.
        let mut b = Builder::new();
        let u32t = b.int("int", 4);
        b.raw("s", kind::STRUCT, false, 1, 4);
        b.w(&[u32::MAX, u32t, 0]);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Malformed(_))
        ));

        // Enumerator name offset out of range.
        let mut b = Builder::new();
        b.raw("e", kind::ENUM, false, 1, 4);
        b.w(&[999, 0]);
        assert!(Btf::parse(&b.build()).is_err());

        // Member type id out of range.
        let mut b = Builder::new();
        b.strukt("s", 4, &[("a", 77, 0, 0)]);
        let e = Btf::parse(&b.build()).unwrap_err();
        assert!(e.to_string().contains("type id 77"), "{e}");

        // Unknown kind.
        let mut b = Builder::new();
        b.raw("future", 25, false, 0, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::UnknownKind { id: 1, kind: 25 })
        ));
        let mut b = Builder::new();
        b.raw("", 0, false, 0, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::UnknownKind { kind: 0, .. })
        ));
    }

    #[test]
    fn cycles_and_blowups_hit_limits() {
        // A struct whose anonymous member is itself, and a typedef cycle.
        let mut b = Builder::new();
        let u32t = b.int("int", 4); // 1
        b.strukt("selfish", 8, &[("", 2, 0, 0), ("x", u32t, 0, 0)]); // 2
        let t1 = b.typedef("t1", 4); // 3 -> 4
        b.typedef("t2", t1); // 4 -> 3
        b.strukt("loop", 8, &[("", t1, 0, 0), ("t", t1, 0, 0)]); // 5
        // Eight levels of 200 anonymous members each, all of the next level's type: no cycle,
        // but 200^8 member visits without a work limit.
        let mut level = b.strukt("leaf", 4, &[("x", u32t, 0, 0)]);
        for _ in 0..8 {
            let many: Vec<M> = (0..200).map(|_| ("", level, 0, 0)).collect();
            level = b.strukt("", 8, &many);
        }
        b.typedef("wide_t", level);
        b.strukt("wide", 8, &[("", level, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let t = std::time::Instant::now();
        for (ty, path) in [
            ("selfish", "x"),
            ("selfish", "nope"),
            ("loop", "x"),
            ("loop", "t.x"),
            ("wide", "nope"),
        ] {
            let r = btf.field_offset(ty, path);
            assert!(
                matches!(r, Err(BtfError::TooComplex { .. })),
                "{ty}.{path}: {r:?}"
            );
        }
        assert!(t.elapsed().as_secs() < 10);
    }

    proptest::proptest! {
        /// Garbage, with and without a valid-looking header (types and strings splitting the
        /// body at `split`), never panics.
        #[test]
        fn garbage_does_not_panic(
            mut b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            header: bool,
            split: u32,
        ) {
            if header && b.len() >= 24 {
                b[..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
                b[4..8].copy_from_slice(&24u32.to_le_bytes());
                let body = (b.len() - 24) as u32;
                let split = split % (body + 1);
                let fields = [0, split, split, body - split];
                for (j, v) in fields.iter().enumerate() {
                    b[8 + 4 * j..12 + 4 * j].copy_from_slice(&v.to_le_bytes());
                }
            }
            if let Ok(btf) = Btf::parse(&b) {
                exercise(&btf);
            }
        }

        /// Valid blobs with one to four bytes overwritten never panic.
        #[test]
        fn flipped_bytes_of_valid_blobs_do_not_panic(
            kernel: bool,
            flips in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()),
                1..5,
            ),
        ) {
            let mut b = if kernel { kernel_like(true, true) } else { sample() };
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            if let Ok(btf) = Btf::parse(&b) {
                exercise(&btf);
            }
        }
    }

    #[test]
    fn error_messages_display() {
        let e = BtfError::Io {
            path: PathBuf::from("/nope"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e.to_string().starts_with("cannot read BTF from /nope"));
        assert!(std::error::Error::source(&e).is_some());
        assert!(Btf::from_file(Path::new("/nonexistent/btf")).is_err());
    }

    #[test]
    fn real_kernel_btf() {
        if !Path::new(Btf::SYSFS_PATH).exists() {
            eprintln!("no {}; skipped", Btf::SYSFS_PATH);
            return;
        }
        let data = std::fs::read(Btf::SYSFS_PATH).unwrap();
        let t = std::time::Instant::now();
        let btf = Btf::parse(&data).unwrap();
        eprintln!(
            "parsed {} bytes, {} types, {} enumerators in {:?}",
            data.len(),
            btf.type_count(),
            btf.enumerators.len(),
            t.elapsed()
        );
        assert!(btf.has_type("bio"));
        assert!(btf.has_type("task_struct"));
        assert_eq!(btf.enum_value("REQ_OP_READ"), Some(0));
        let size = btf.field_offset("bio", "bi_iter.bi_size").unwrap();
        let opf = btf.field_offset("bio", "bi_opf").unwrap();
        assert!(
            opf < size && size < 256,
            "bi_opf {opf}, bi_iter.bi_size {size}"
        );
        // Every member of every named struct resolves or fails cleanly.
        let (mut ok, mut failed) = (0, 0);
        for t in &btf.types {
            if !matches!(t.kind(), kind::STRUCT | kind::UNION) {
                continue;
            }
            // The name offset is the word 12 bytes before the kind-specific data.
            let name_off = btf.word(t.extra as usize - TYPE_LEN).unwrap();
            let Some(Ok(name)) = btf.name_of(name_off).map(std::str::from_utf8) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            for j in 0..t.vlen() as usize {
                let off = btf.word(t.extra as usize + 12 * j).unwrap();
                let member = std::str::from_utf8(btf.name_of(off).unwrap()).unwrap();
                if member.is_empty() {
                    continue;
                }
                match btf.field_offset(name, member) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        eprintln!("real BTF: {ok} member lookups resolved, {failed} failed (bitfields, dups)");
        assert!(ok > 10 * failed);
    }
}
