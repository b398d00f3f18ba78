//! Counted nouns in messages: "1 VM", "2 VMs", never "1 VMs" or "VM(s)".

use std::fmt::Display;

/// `n` and `noun`, the noun in the plural unless `n` is one: `plural(1, "VM")` is `1 VM`,
/// `plural(3, "host")` is `3 hosts`. Every noun Shoal counts takes an `s`.
pub fn plural<N: Display + PartialEq + From<u8>>(n: N, noun: &str) -> String {
    if n == N::from(1) {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_anything_else_plural() {
        assert_eq!(plural(1usize, "VM"), "1 VM");
        assert_eq!(plural(0u64, "VM"), "0 VMs");
        assert_eq!(plural(2u32, "host"), "2 hosts");
        assert_eq!(plural(65_000u32, "chunk"), "65000 chunks");
    }
}
