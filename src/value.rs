//! Secret values. `SecretValue` has no `Debug`, `Display` or `Serialize`
//! that shows the value: reading it needs an explicit `expose()`.

use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};

use crate::crd::Alphabet;

/// A credential value. Debug prints `SecretValue([REDACTED])`.
#[derive(Clone)]
pub struct SecretValue(SecretString);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// Reads a value from Secret data bytes; `None` unless valid UTF-8.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(Self::new)
    }

    /// The value itself. Call only to hand it to a store, an identity provider
    /// or a comparison; never to log or format it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn same_as(&self, other: &SecretValue) -> bool {
        self.expose() == other.expose()
    }

    /// A fresh value from the operating system's CSPRNG.
    pub fn generate(length: usize, alphabet: Alphabet) -> Self {
        const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        const HEX: &[u8] = b"0123456789abcdef";
        const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let chars = match alphabet {
            Alphabet::Alphanumeric => ALNUM,
            Alphabet::Hex => HEX,
            Alphabet::Base64Url => B64URL,
        };
        let mut rng = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
        let s: String = (0..length)
            .map(|_| chars[rng.random_range(0..chars.len())] as char)
            .collect();
        Self::new(s)
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let v = SecretValue::new("canary-debug-7f3a");
        assert!(!format!("{v:?}").contains("canary"));
        assert!(!format!("{:?}", Some(vec![v])).contains("canary"));
    }

    #[test]
    fn generated_values_use_the_alphabet_and_length() {
        let v = SecretValue::generate(64, Alphabet::Hex);
        assert_eq!(v.expose().len(), 64);
        assert!(v.expose().chars().all(|c| c.is_ascii_hexdigit()));
        let w = SecretValue::generate(64, Alphabet::Hex);
        assert!(!v.same_as(&w), "two draws of 256 bits must differ");
        let b = SecretValue::generate(200, Alphabet::Base64Url);
        assert!(
            b.expose()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
