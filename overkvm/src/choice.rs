//! Closed sets of named values that users pick by name (on the command line, in config files):
//! the library says which values exist and what they mean; the command-line layer turns that
//! into parsing and help without the library depending on it.

/// A value picked by name from a closed set.
pub trait Choice: Copy + Send + Sync + 'static {
    /// Every value, in the order help lists them.
    const VALUES: &'static [Self];
    /// The canonical name (kebab-case).
    fn name(self) -> &'static str;
    /// One line on what the value means.
    fn help(self) -> &'static str;
    /// Other accepted spellings.
    fn aliases(self) -> &'static [&'static str] {
        &[]
    }
}

/// The value named `s` (its name or an alias; `ignore_case` for ASCII case).
pub fn parse<T: Choice>(s: &str, ignore_case: bool) -> Option<T> {
    let same = |a: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(s)
        } else {
            a == s
        }
    };
    T::VALUES
        .iter()
        .copied()
        .find(|v| same(v.name()) || v.aliases().iter().any(|a| same(a)))
}
