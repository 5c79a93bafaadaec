//! Human-friendly sizes ("8MiB", "64KiB", "1GB") and durations ("30s",
//! "500ms", "1h") for configuration files. Both also accept plain integers
//! (bytes and seconds respectively).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::TypesError;

/// A size in bytes that reads and prints as `8MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

impl FromStr for ByteSize {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        let n: f64 = num
            .parse()
            .map_err(|_| TypesError::invalid("size", format!("{s:?}: expected e.g. \"8MiB\"")))?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => {
                return Err(TypesError::invalid(
                    "size",
                    format!("{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"),
                ))
            }
        };
        Ok(ByteSize((n * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if b >= size {
                return write!(f, "{:.1}{unit}", b as f64 / size as f64);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// A duration that reads and prints as `30s`, `500ms`, `5m`, `1h`, `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        let n: f64 = num.parse().map_err(|_| {
            TypesError::invalid("duration", format!("{s:?}: expected e.g. \"30s\""))
        })?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            other => {
                return Err(TypesError::invalid(
                    "duration",
                    format!("{s:?}: unknown unit {other:?} (use ms, s, m, h, d)"),
                ))
            }
        };
        Ok(HumanDuration(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60)] {
            if s >= size && s.is_multiple_of(size) {
                return write!(f, "{}{unit}", s / size);
            }
        }
        write!(f, "{s}s")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(HumanDuration(Duration::from_secs(n))),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("8MiB".parse::<ByteSize>().unwrap().0, 8 << 20);
        assert_eq!("64 KiB".parse::<ByteSize>().unwrap().0, 64 << 10);
        assert_eq!("1GB".parse::<ByteSize>().unwrap().0, 1_000_000_000);
        assert_eq!("123".parse::<ByteSize>().unwrap().0, 123);
        assert!("8 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(8 << 20).to_string(), "8MiB");
        assert_eq!(ByteSize(1536).to_string(), "1.5KiB");
    }

    #[test]
    fn durations() {
        assert_eq!(
            "30s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(30)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "1h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(3600)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
        assert_eq!(HumanDuration(Duration::from_secs(7200)).to_string(), "2h");
    }

    #[test]
    fn serde_in_toml() {
        #[derive(Deserialize)]
        struct C {
            a: ByteSize,
            b: HumanDuration,
            c: ByteSize,
        }
        let c: C = toml::from_str("a = \"8MiB\"\nb = \"1m\"\nc = 42").unwrap();
        assert_eq!((c.a.0, c.b.0.as_secs(), c.c.0), (8 << 20, 60, 42));
    }
}
