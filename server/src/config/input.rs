//! Bounded input for the YAML configuration, checked before it is parsed into settings:
//!
//! * the file is read with a limit ([`MAX_CONFIG_BYTES`], 16 MiB): `--config /dev/zero` fails
//!   after reading 16 MiB, not at the OOM killer;
//! * bad UTF-8 and NUL bytes are errors naming their line;
//! * the document's size once YAML aliases are expanded is counted by a walk that allocates
//!   nothing and stops at [`MAX_YAML_NODES`], so nested aliases (a "billion laughs" document of a
//!   few KB) are refused before anything is built from them;
//! * no list may be longer than the backend quota (65,535), and lists that have a quota
//!   (services, a service's backends) stop at it while being read, with the line, instead of
//!   building a million entries first;
//! * unknown and duplicate top-level keys, which serde_yaml reports without a position, get the
//!   line of the key.

use std::cell::Cell;
use std::io::Read;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use dlb::model;

use super::ConfigError;

/// The largest configuration file `dlbd` reads.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The most YAML nodes (scalars, sequences, mappings) a configuration may have once its aliases
/// are expanded. A service at the backend quota written out in full is about 330,000.
pub const MAX_YAML_NODES: u64 = 1_000_000;

/// The longest list any configuration holds (a service's backends, [`model::MAX_BACKENDS_PER_SERVICE`]):
/// the walk refuses a longer one at its first entry past it, whatever it is made of.
const MAX_LIST: usize = model::MAX_BACKENDS_PER_SERVICE;

fn syntax(file: &str, message: String, line: Option<usize>) -> ConfigError {
    ConfigError::Syntax {
        file: file.to_owned(),
        message,
        line,
    }
}

/// The 1-based line of byte `at` in `bytes`.
fn line_of(bytes: &[u8], at: usize) -> usize {
    bytes[..at.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads `p` (at most [`MAX_CONFIG_BYTES`]) as UTF-8 text without NUL bytes.
pub(crate) fn read_file(p: &Path, file: &str) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        file: file.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(p)
        .map_err(read_err)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(syntax(
            file,
            format!(
                "the file is larger than {} MiB, the most a configuration may be",
                MAX_CONFIG_BYTES >> 20
            ),
            None,
        ));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = line_of(e.as_bytes(), at);
            Err(syntax(
                file,
                format!("invalid UTF-8 at line {line} (byte {at})"),
                Some(line),
            ))
        }
    }
}

/// Refuses NUL bytes and documents too large once aliases are expanded (see the module docs).
pub(crate) fn check_text(text: &str, file: &str) -> Result<(), ConfigError> {
    check_text_within(text, file, MAX_YAML_NODES)
}

fn check_text_within(text: &str, file: &str, budget: u64) -> Result<(), ConfigError> {
    if let Some(at) = text.bytes().position(|b| b == 0) {
        let line = line_of(text.as_bytes(), at);
        return Err(syntax(
            file,
            format!("a NUL byte at line {line}: not a text file"),
            Some(line),
        ));
    }
    let count = Count {
        seen: &Cell::new(0),
        budget,
    };
    count
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| syntax(file, e.to_string(), e.location().map(|l| l.line())))
}

/// Gives serde_yaml's errors about top-level keys (which it places at the document's start, or
/// nowhere) the line of the key; says what a "repetition limit" is.
pub(crate) fn locate_top_level(text: &str, file: &str, e: &serde_yaml::Error) -> ConfigError {
    let full = e.to_string();
    let mut line = e.location().map(|l| l.line());
    // Top-level errors carry no path prefix ("services[0]: ...").
    let top_key = |kind: &str| {
        let rest = full.strip_prefix(&format!("{kind} field `"))?;
        Some(rest.split_once('`')?.0.to_owned())
    };
    let found = match (top_key("unknown"), top_key("duplicate")) {
        (Some(k), _) => Some((k, 0)),
        (None, Some(k)) => Some((k, 1)),
        (None, None) => None,
    };
    let message = match found {
        Some((key, nth)) => {
            line = text
                .lines()
                .enumerate()
                .filter(|(_, l)| {
                    l.strip_prefix(key.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with(':'))
                })
                .nth(nth)
                .map(|(i, _)| i + 1)
                .or(line);
            let bare = full.split(" at line ").next().unwrap_or(&full);
            match line {
                Some(l) => format!("{bare} at line {l}"),
                None => bare.to_owned(),
            }
        }
        None if full.starts_with("repetition limit exceeded") => {
            format!("{full}: the document's aliases expand to too much; refusing to parse it")
        }
        None => full,
    };
    syntax(file, message, line)
}

/// Walks a document as serde sees it (aliases expanded), counting nodes, allocating nothing.
#[derive(Clone, Copy)]
struct Count<'a> {
    seen: &'a Cell<u64>,
    budget: u64,
}

impl Count<'_> {
    fn tick<E: de::Error>(&self) -> Result<(), E> {
        let n = self.seen.get() + 1;
        self.seen.set(n);
        if n > self.budget {
            return Err(E::custom(format!(
                "the document has more than {} YAML nodes once its aliases are expanded; \
                 refusing to parse it",
                self.budget
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! leaf {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { self.tick() })*
    };
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    leaf!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
          visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.tick()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.tick()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick()?;
        let mut n = 0usize;
        while seq.next_element_seed(self)?.is_some() {
            n += 1;
            if n > MAX_LIST {
                return Err(de::Error::custom(format!(
                    "more than {MAX_LIST} entries (the quota of a service's backends, the \
                     longest list a configuration holds)"
                )));
            }
        }
        Ok(())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.tick()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess;
        self.tick()?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

/// A list of at most `N` entries: the entry past the quota is an error (with the list's line)
/// before it is built.
pub(crate) fn at_most<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const N: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {N} entries")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(1024));
            while let Some(v) = seq.next_element()? {
                if out.len() == N {
                    return Err(de::Error::custom(format!(
                        "more than {N} entries (the quota)"
                    )));
                }
                out.push(v);
            }
            Ok(out)
        }
    }

    d.deserialize_seq(Bounded::<T, N>(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerConfig;

    fn err(yaml: &str) -> ConfigError {
        ServerConfig::from_yaml_str(yaml).unwrap_err()
    }

    #[test]
    fn nested_aliases_are_refused_before_expanding() {
        // 1,000 scalars, 1,000 aliases of them, 100 aliases of those: 10^8 nodes once
        // expanded from 10 KB of text, and few enough alias jumps that serde_yaml's own
        // repetition limit does not see it.
        let mut yaml = format!("a0: &a0 [{}]\n", vec!["x"; 1000].join(", "));
        yaml.push_str(&format!("a1: &a1 [{}]\n", vec!["*a0"; 1000].join(", ")));
        yaml.push_str(&format!("a2: &a2 [{}]\n", vec!["*a1"; 100].join(", ")));
        let e = err(&yaml);
        assert!(e.to_string().contains("YAML nodes once its aliases"), "{e}");
        assert!(e.line().is_some(), "{e}");
        // A few aliases are fine (the same document, two levels deep, fails only on the
        // unknown key).
        let small = "a0: &a0 [x, x]\na1: [*a0, *a0]\n";
        assert!(
            !err(small).to_string().contains("YAML nodes"),
            "{}",
            err(small)
        );
    }

    #[test]
    fn nul_bytes_and_unknown_or_duplicate_top_level_keys_name_their_line() {
        let e = err("listen: 127.0.0.1:1\n\nhistory_size: 5\x00\n");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().contains("NUL"), "{e}");
        let e = err("listen: 127.0.0.1:1\n# c\nlisten_typo: x\n");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = err("listen: 127.0.0.1:1\nhistory_size: 5\nlisten: 127.0.0.1:2\n");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn files_are_read_with_a_limit_and_as_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, b"listen: 127.0.0.1:1\nservices:\n  - name: \xff\xfe\n").unwrap();
        let e = ServerConfig::from_yaml_file(&p).unwrap_err();
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().contains("invalid UTF-8"), "{e}");
        #[cfg(unix)]
        {
            let e = ServerConfig::from_yaml_file(Path::new("/dev/zero")).unwrap_err();
            assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
        }
    }

    #[test]
    fn a_million_backends_stop_at_the_quota_with_the_line() {
        let mut yaml = String::from("services:\n");
        for i in 0..10_001 {
            yaml.push_str(&format!("  - name: s{i}\n"));
        }
        let e = err(&yaml);
        assert!(e.to_string().contains("more than 10000 entries"), "{e}");
        assert_eq!(e.line(), Some(2), "{e}");
        // A million of them, written with an alias (4 MB): the same, at the list's entry.
        let yaml = format!(
            "services:\n  - name: big\n    backends: [&b {{id: a, address: \"h:1\"}}, {}]\n",
            vec!["*b"; 999_999].join(", ")
        );
        let e = err(&yaml);
        assert!(
            e.to_string()
                .contains("services[0].backends: more than 65535 entries"),
            "{e}"
        );
        assert_eq!(e.line(), Some(3), "{e}");
    }
}
