//! Mooncake's priority matrix: location → `[preferred, available]` device names.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use mooncake_common::{Error, ErrorKind, Result};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The location used for buffers whose location is unknown.
pub const WILDCARD: &str = "*";

/// Environment variable naming a file that holds a priority matrix (Mooncake's override).
pub const CUSTOM_TOPO_ENV: &str = "MC_CUSTOM_TOPO_JSON";

/// The devices for one location, best first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// Devices to pick from first.
    pub preferred: Vec<String>,
    /// Devices that reach the location, but worse; used when no preferred one works.
    pub available: Vec<String>,
}

/// Location → [`Entry`], in insertion order (CPU nodes first, then GPUs by ordinal).
///
/// Serializes to and parses from Mooncake's JSON shape
/// `{"cpu:0": [["mlx5_0"], ["mlx5_1"]], ...}`, keeping the order of the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityMatrix {
    entries: Vec<(String, Entry)>,
}

impl PriorityMatrix {
    /// An empty matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the entry for `location`, replacing an existing one in place.
    pub fn insert(&mut self, location: impl Into<String>, entry: Entry) {
        let location = location.into();
        match self.entries.iter_mut().find(|(name, _)| *name == location) {
            Some((_, slot)) => *slot = entry,
            None => self.entries.push((location, entry)),
        }
    }

    /// The entry for exactly `location`.
    pub fn get(&self, location: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|(name, _)| name == location)
            .map(|(_, entry)| entry)
    }

    /// Every `(location, entry)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries
            .iter()
            .map(|(name, entry)| (name.as_str(), entry))
    }

    /// Number of locations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the matrix has no location.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry used for `location`: its own, else an explicit `"*"` entry, else the synthetic
    /// wildcard that lists every device as preferred (Mooncake's `resolve`).
    pub fn entry_for(&self, location: &str) -> Cow<'_, Entry> {
        match self.get(location).or_else(|| self.get(WILDCARD)) {
            Some(entry) => Cow::Borrowed(entry),
            None => Cow::Owned(Entry {
                preferred: self.devices(),
                available: Vec::new(),
            }),
        }
    }

    /// Every device named anywhere, in first-seen order (each entry's preferred list, then its
    /// available list). The order is stable for a given document.
    pub fn devices(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for (_, entry) in &self.entries {
            for name in entry.preferred.iter().chain(&entry.available) {
                if !seen.contains(name) {
                    seen.push(name.clone());
                }
            }
        }
        seen
    }

    /// Drops every device not in `allowed` from every entry; locations are kept.
    pub fn restrict<S: AsRef<str>>(&mut self, allowed: &[S]) {
        let keep = |name: &String| allowed.iter().any(|a| a.as_ref() == name);
        for (_, entry) in &mut self.entries {
            entry.preferred.retain(keep);
            entry.available.retain(keep);
        }
    }

    /// Parses Mooncake's JSON. Anything but an object of `[[string...], [string...]]` pairs is
    /// [`ErrorKind::MalformedJson`].
    pub fn parse(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::new(ErrorKind::MalformedJson, format!("priority matrix: {e}")).with_source(e)
        })
    }

    /// Reads and parses a matrix file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(format!("cannot read topology file {}: {e}", path.display()))
                .with_source(e)
        })?;
        Self::parse(&text)
    }

    /// The matrix from the file named by `MC_CUSTOM_TOPO_JSON`, if that variable is set.
    pub fn from_env() -> Option<Result<Self>> {
        let path = std::env::var_os(CUSTOM_TOPO_ENV).filter(|p| !p.is_empty())?;
        Some(Self::load(Path::new(&path)))
    }

    /// The matrix as compact JSON in Mooncake's shape.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

impl fmt::Display for PriorityMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (location, entry) in &self.entries {
            writeln!(
                f,
                "  {location:<8} preferred [{}]  available [{}]",
                entry.preferred.join(", "),
                entry.available.join(", ")
            )?;
        }
        Ok(())
    }
}

impl Serialize for PriorityMatrix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (location, entry) in &self.entries {
            map.serialize_entry(location, &(&entry.preferred, &entry.available))?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for PriorityMatrix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MatrixVisitor;

        impl<'de> Visitor<'de> for MatrixVisitor {
            type Value = PriorityMatrix;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping locations to [preferred, available] name lists")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut matrix = PriorityMatrix::new();
                while let Some((location, (preferred, available))) =
                    map.next_entry::<String, (Vec<String>, Vec<String>)>()?
                {
                    matrix.insert(
                        location,
                        Entry {
                            preferred,
                            available,
                        },
                    );
                }
                Ok(matrix)
            }
        }

        deserializer.deserialize_map(MatrixVisitor)
    }
}
