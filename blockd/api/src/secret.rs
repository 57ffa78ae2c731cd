//! Secrets (provider keys, passphrases) as they travel and are held.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A secret string. Serialized as itself (it has to reach the daemon and
/// its 0600 credentials file), but never shown by `Debug` or `Display`,
/// so no log line, error or panic message can carry it; its memory is
/// wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_nowhere_but_serialized() {
        let s = Secret::from("hunter2-xyz".to_string());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"hunter2-xyz\"");
        let back: Secret = serde_json::from_str(&j).unwrap();
        assert_eq!(back.expose(), "hunter2-xyz");
    }
}
