//! Collects every mistake found in one derive input, so that a single compile reports them all
//! (the idea of serde's `Ctxt`).

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

#[cfg(test)]
mod tests {
    use super::*;

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
