//! Short, stable fingerprints (FNV-1a, 64 bit) for status and names. Stable
//! across rekey builds, unlike std's hasher; not for anything secret.

/// FNV-1a of `bytes`, as 16 hex digits.
pub fn fnv1a(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

/// FNV-1a of a value's JSON.
pub fn of_json<T: serde::Serialize>(value: &T) -> String {
    fnv1a(serde_json::to_string(value).unwrap_or_default().as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_vectors() {
        assert_eq!(super::fnv1a(b""), "cbf29ce484222325");
        assert_eq!(super::fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
