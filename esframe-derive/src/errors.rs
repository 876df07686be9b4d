//! Collects every mistake found in one derive input, so that a single compile reports them all
//! (the idea of serde's `Ctxt`), and finds the name a misspelled one was meant to be.

use std::fmt::Display;

use proc_macro2::TokenStream;
use quote::ToTokens;

/// The errors found so far in one derive input.
#[derive(Default)]
pub(crate) struct Errors {
    errors: Vec<syn::Error>,
}

impl Errors {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records an error that spans all of `tokens` (the user's tokens the mistake is in).
    pub(crate) fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.errors.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records an error syn produced, such as a syntax error inside an attribute.
    pub(crate) fn push(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// Records the error of `result`, if any, and gives back its value.
    pub(crate) fn check<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|error| self.push(error)).ok()
    }

    /// The impl if the input was valid; otherwise every error followed by `fallback`, a minimal
    /// impl that keeps one mistake from cascading into "trait not implemented" errors elsewhere.
    pub(crate) fn expand_or_fallback<M>(
        self,
        model: Option<M>,
        expand: impl FnOnce(M) -> TokenStream,
        fallback: impl FnOnce() -> TokenStream,
    ) -> TokenStream {
        match (self.finish(), model) {
            (Ok(()), Some(model)) => expand(model),
            (Err(errors), _) => {
                let mut out = errors;
                out.extend(fallback());
                out
            }
            (Ok(()), None) => fallback(),
        }
    }

    /// `Ok` if nothing was recorded, otherwise every recorded error as `compile_error!` calls.
    pub(crate) fn finish(self) -> Result<(), TokenStream> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self
                .errors
                .into_iter()
                .map(syn::Error::into_compile_error)
                .collect())
        }
    }
}

/// The candidate `written` is most likely a misspelling of, for "did you mean" in a message:
/// the closest (first on a tie) within one edit per three characters of `written` (at least
/// one), ignoring case. An edit inserts, removes or replaces a character, or swaps two adjacent
/// ones.
pub(crate) fn closest<'a>(
    written: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let written = written.to_lowercase();
    let limit = written.chars().count().max(3) / 3;
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&written, &candidate.to_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance with adjacent swaps (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // `rows[i % 3][j]`: the distance between the first `i` chars of `a` and `j` of `b`.
    let mut rows = [
        (0..=b.len()).collect(),
        vec![0; b.len() + 1],
        vec![0; b.len() + 1],
    ];
    for i in 1..=a.len() {
        let (now, prev, before) = (i % 3, (i + 2) % 3, (i + 1) % 3);
        rows[now][0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[prev][j] + 1)
                .min(rows[now][j - 1] + 1)
                .min(rows[prev][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[before][j - 2] + 1);
            }
            rows[now][j] = best;
        }
    }
    rows[a.len() % 3][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_only_likely_misspellings() {
        let keys = ["name", "command", "event", "error", "services"];
        for (written, expected) in [
            ("comand", Some("command")),
            ("evnet", Some("event")),
            ("service", Some("services")),
            ("Command", Some("command")),
            ("rename", Some("name")),
            ("colour", None),
            ("cmd", None),
            ("", None),
        ] {
            assert_eq!(closest(written, keys), expected, "{written}");
        }
        assert_eq!(closest("card_id", ["owner", "cart_id"]), Some("cart_id"));
        assert_eq!(
            closest("aggregate", ["aggregate_id", "command_id"]),
            Some("aggregate_id")
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn reports_every_recorded_error() {
        let mut errors = Errors::new();
        assert!(Errors::new().finish().is_ok());
        errors.push(syn::Error::new(
            proc_macro2::Span::call_site(),
            "first mistake",
        ));
        errors.spanned(quote::quote!(a b), "second mistake");
        let third = syn::Error::new(proc_macro2::Span::call_site(), "third");
        let _: Option<()> = errors.check(Err(third));
        let tokens = errors.finish().unwrap_err().to_string();
        for message in ["first mistake", "second mistake", "third"] {
            assert!(tokens.contains(message), "{tokens}");
        }
    }
}
