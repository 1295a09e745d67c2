//! Secret values. `SecretValue` has no `Debug`, `Display` or `Serialize`
//! that shows the value: reading it needs an explicit `expose()`. Its buffer
//! is wiped when dropped (secrecy's `SecretString` zeroizes), and so is every
//! `String` it was made from here: what remains are the copies listed in
//! docs/secrets.md.

use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use zeroize::{Zeroize, Zeroizing};

use crate::crd::Alphabet;

/// A credential value. Debug prints `SecretValue([REDACTED])`.
#[derive(Clone)]
pub struct SecretValue(SecretString);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        // Copied into an exact-size buffer and the given String wiped:
        // `SecretString::from(String)` shrinks it, which may move the value
        // and leave the old buffer behind unwiped.
        let value = Zeroizing::new(value.into());
        Self(SecretString::from(value.as_str()))
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
        // Sized up front: no growth leaves a partial copy behind.
        let mut s = Zeroizing::new(String::with_capacity(length));
        s.extend((0..length).map(|_| chars[rng.random_range(0..chars.len())] as char));
        Self(SecretString::from(s.as_str()))
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

/// A JSON document rekey built or parsed around a value (a request body, a
/// provider's answer): every string in it is wiped when dropped.
pub struct WipedJson(pub serde_json::Value);

impl Drop for WipedJson {
    fn drop(&mut self) {
        wipe_json(&mut self.0);
    }
}

/// Wipes every string of `v` in place (object keys are names, not values).
pub fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// Wipes the values of a form rekey built (e.g. an OAuth token request).
pub fn wipe_form(form: &mut [(&str, String)]) {
    form.iter_mut().for_each(|(_, v)| v.zeroize());
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
    fn the_buffers_around_a_value_are_wiped() {
        // What `new` relies on: a Zeroizing String is cleared in place.
        let mut s = Zeroizing::new(String::from("canary-wipe-51c2"));
        zeroize::Zeroize::zeroize(&mut *s);
        assert!(s.is_empty());
        // SecretValue holds secrecy's SecretString, which zeroizes on drop.
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<SecretString>();
        let v = SecretValue::new(String::from("canary-wipe-51c2"));
        assert_eq!(v.expose(), "canary-wipe-51c2");
        // Request bodies and parsed answers: every string, at any depth.
        let mut body =
            serde_json::json!({"data": {"k": "canary-wipe-51c2"}, "v": ["canary-wipe-51c2", 3]});
        wipe_json(&mut body);
        assert_eq!(body, serde_json::json!({"data": {"k": ""}, "v": ["", 3]}));
        let mut form = [("client_secret", String::from("canary-wipe-51c2"))];
        wipe_form(&mut form);
        assert!(form[0].1.is_empty());
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
