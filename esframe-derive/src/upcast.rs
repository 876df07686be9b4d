//! `#[event(upcast(v1 = path, ...))]` on an event variant: the functions that bring stored
//! payloads of its event type, one version at a time, up to the version the variant declares.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::{
    Expr, ExprLit, ExprPath, Ident, Lit, Path, Token, meta::ParseNestedMeta, spanned::Spanned,
    token,
};

use crate::{attr, errors::Errors};

/// A step as written, for the examples in error messages.
const STEP_EXAMPLE: &str = "v1 = money_deposited_v1";

/// The upcasters one variant declares, over all its `upcast(...)` lists.
#[derive(Default)]
pub(crate) struct Upcasts {
    /// The first `upcast` keyword: where a gap in the chain is reported.
    keyword: Option<Path>,
    /// Each version declared once, in the order written.
    steps: Vec<Step>,
}

/// `vN = path`: the upcaster from schema version `from` to `from + 1`.
struct Step {
    key: Ident,
    from: u32,
    /// `None` when the value was wrong (already reported): the version still counts for the chain.
    function: Option<ExprPath>,
}

impl Upcasts {
    /// Reads the `upcast(...)` list after the `upcast` key of `meta`, recording every mistake.
    pub(crate) fn parse(
        &mut self,
        errors: &mut Errors,
        meta: &ParseNestedMeta<'_>,
    ) -> syn::Result<()> {
        if !meta.input.peek(token::Paren) {
            errors.spanned(
                &meta.path,
                format_args!("`upcast` takes a list of upcasters, e.g. `upcast({STEP_EXAMPLE})`"),
            );
            return attr::skip_value(meta);
        }
        if self.keyword.is_none() {
            self.keyword = Some(meta.path.clone());
        }
        meta.parse_nested_meta(|step| self.parse_step(errors, &step))
    }

    /// Reads one `vN = path`.
    fn parse_step(&mut self, errors: &mut Errors, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
        let from = step_version(errors, &meta.path);
        let function = if meta.input.peek(Token![=]) {
            function_path(errors, meta)?
        } else {
            if from.is_some() {
                errors.spanned(
                    &meta.path,
                    format_args!(
                        "`{}` needs the upcaster function, e.g. `{STEP_EXAMPLE}`",
                        attr::path_to_string(&meta.path)
                    ),
                );
            }
            attr::skip_value(meta)?;
            None
        };
        let (Some(from), Some(key)) = (from, meta.path.get_ident()) else {
            return Ok(());
        };
        if self.steps.iter().any(|step| step.from == from) {
            errors.spanned(
                key,
                format_args!(
                    "duplicate upcaster `{key}`: one function reads each version, remove one"
                ),
            );
            return Ok(());
        }
        self.steps.push(Step {
            key: key.clone(),
            from,
            function,
        });
        Ok(())
    }

    /// Checks the declared versions against `version`, the variant's current schema version:
    /// each reads an older version, and together they climb without gaps to `version`.
    pub(crate) fn validate(&self, errors: &mut Errors, name: &str, version: u32) {
        let mut chain = Vec::new();
        for step in &self.steps {
            if step.from >= version {
                errors.spanned(
                    &step.key,
                    format_args!(
                        "`{}` would upcast to v{}, but `{name}` is at version {version}: an \
                         upcaster reads a version older than the current one",
                        step.key,
                        u64::from(step.from) + 1,
                    ),
                );
            } else {
                chain.push(step.from);
            }
        }
        let (Some(&lowest), Some(keyword)) = (chain.iter().min(), &self.keyword) else {
            return;
        };
        let missing: Vec<String> = (lowest..version)
            .filter(|from| !chain.contains(from))
            .map(|from| format!("`v{from}`"))
            .collect();
        if let Some((last, rest)) = missing.split_last() {
            let list = if rest.is_empty() {
                format!("upcaster {last}")
            } else {
                format!("upcasters {} and {last}", rest.join(", "))
            };
            errors.spanned(
                keyword,
                format_args!(
                    "missing {list}: the chain from v{lowest} must reach v{version} one version \
                     at a time"
                ),
            );
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// One `Arc<FnUpcaster>` per declared version, lowest first, for the event type `name`.
    /// Each function is coerced to the upcaster signature where the user wrote its path, so a
    /// wrong signature is reported there.
    pub(crate) fn expand(&self, name: &str) -> Vec<TokenStream> {
        let mut steps: Vec<&Step> = self.steps.iter().collect();
        steps.sort_by_key(|step| step.from);
        steps
            .into_iter()
            .filter_map(|step| {
                let function = step.function.as_ref()?;
                let from = step.from;
                // Resolved at the call site (so no lint sees the user's code), located on the path.
                let span = Span::call_site().located_at(function.span());
                let checked = quote_spanned! {span=>
                    {
                        let upcaster: fn(
                            ::esframe_core::__private::serde_json::Value,
                        ) -> ::core::result::Result<
                            ::esframe_core::upcast::Upcast,
                            ::esframe_core::upcast::UpcastFailure,
                        > = #function;
                        upcaster
                    }
                };
                Some(quote! {
                    ::std::sync::Arc::new(::esframe_core::upcast::upcaster(#name, #from, #checked))
                })
            })
            .collect()
    }
}

/// The version `N` of a key `vN`, or `None` after reporting a key of another form.
fn step_version(errors: &mut Errors, path: &Path) -> Option<u32> {
    let written = attr::path_to_string(path);
    let digits = path
        .get_ident()
        .map(ToString::to_string)
        .and_then(|ident| ident.strip_prefix('v').map(str::to_owned))
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    let Some(digits) = digits else {
        errors.spanned(
            path,
            format_args!(
                "`{written}` is not an upcaster key: upcaster keys are `v<N>`, the version the \
                 upcaster reads, e.g. `{STEP_EXAMPLE}`"
            ),
        );
        return None;
    };
    if digits.bytes().all(|b| b == b'0') {
        errors.spanned(
            path,
            format_args!(
                "there is no `{written}`: schema versions start at 1, so the oldest upcaster is `v1`"
            ),
        );
        return None;
    }
    match digits.parse::<u32>() {
        Ok(version) if !digits.starts_with('0') => Some(version),
        Ok(version) => {
            errors.spanned(
                path,
                format_args!("write `{written}` as `v{version}`, without leading zeros"),
            );
            None
        }
        Err(_) => {
            errors.spanned(
                path,
                format_args!("`{written}` is too large: schema versions fit in a `u32`"),
            );
            None
        }
    }
}

/// Reads `= path`, the upcaster function. Reports anything else on the value.
fn function_path(errors: &mut Errors, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<ExprPath>> {
    let expr: Expr = meta.value()?.parse()?;
    let key = attr::path_to_string(&meta.path);
    match attr::ungroup(&expr) {
        Expr::Path(path) if path.attrs.is_empty() => return Ok(Some(path.clone())),
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) if lit.parse::<Path>().is_ok() => errors.spanned(
            &expr,
            format_args!(
                "`{key}` takes the upcaster function's path, not a string: write `{key} = {}`",
                lit.value()
            ),
        ),
        Expr::Closure(_) => errors.spanned(
            &expr,
            format_args!(
                "`{key}` takes the upcaster function's path, not a closure: move the closure \
                 into a `fn` and write `{key} = that_fn`"
            ),
        ),
        _ => errors.spanned(
            &expr,
            format_args!(
                "`{key}` takes the path of an upcaster function \
                 `fn(serde_json::Value) -> Result<Upcast, UpcastFailure>`, e.g. `{STEP_EXAMPLE}`"
            ),
        ),
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::{Attribute, parse_quote};

    /// Parses `attr` as a variant's `#[event(...)]` and validates it against `version`.
    fn check(attr: Attribute, version: u32) -> (Vec<String>, Vec<u32>) {
        let mut errors = Errors::new();
        let mut upcasts = Upcasts::default();
        attr::for_each_key(&[attr], "event", &mut errors, |errors, meta| {
            upcasts.parse(errors, &meta)
        });
        upcasts.validate(&mut errors, "MoneyDeposited", version);
        let messages = match errors.finish() {
            Ok(()) => Vec::new(),
            Err(tokens) => tokens
                .into_iter()
                .filter_map(|token| match token {
                    proc_macro2::TokenTree::Group(group) => Some(group.stream().to_string()),
                    _ => None,
                })
                .collect(),
        };
        (
            messages,
            upcasts.steps.iter().map(|step| step.from).collect(),
        )
    }

    #[test]
    fn reads_contiguous_chains_ending_below_the_version() {
        let (errors, steps) = check(
            parse_quote!(#[event(upcast(v2 = a::b, v1 = c), upcast(v3 = <T as U>::d))]),
            4,
        );
        assert_eq!(errors, Vec::<String>::new());
        assert_eq!(steps, [2, 1, 3]);
        let (errors, _) = check(parse_quote!(#[event(upcast(v3 = f))]), 4);
        assert_eq!(errors, Vec::<String>::new(), "a chain may start late");
    }

    #[test]
    fn reports_keys_of_another_form() {
        let (errors, steps) = check(
            parse_quote!(#[event(upcast(from1 = f, v = f, vx = f, v01 = f, a::v1 = f, v0 = f, v1 = f))]),
            2,
        );
        assert_eq!(steps, [1]);
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(
            errors[0].contains("`from1` is not an upcaster key"),
            "{errors:?}"
        );
        assert!(errors[3].contains("without leading zeros"), "{errors:?}");
        assert!(errors[5].contains("there is no `v0`"), "{errors:?}");
    }

    #[test]
    fn reports_duplicates_versions_too_new_and_gaps() {
        let (errors, _) = check(
            parse_quote!(#[event(upcast(v1 = f, v4 = g), upcast(v1 = h, v6 = i))]),
            6,
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("duplicate upcaster `v1`"), "{errors:?}");
        assert!(
            errors[1].contains("`v6` would upcast to v7, but `MoneyDeposited` is at version 6"),
            "{errors:?}"
        );
        assert!(
            errors[2]
                .contains("missing upcasters `v2`, `v3` and `v5`: the chain from v1 must reach v6"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_wrong_value_still_counts_for_the_chain() {
        let (errors, steps) = check(parse_quote!(#[event(upcast(v1 = "f", v2 = |p| p, v3))]), 4);
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].contains("not a string: write `v1 = f`"),
            "{errors:?}"
        );
        assert!(
            errors[2].contains("`v3` needs the upcaster function"),
            "{errors:?}"
        );
    }

    #[test]
    fn expands_lowest_first_with_a_signature_check() {
        let mut errors = Errors::new();
        let mut upcasts = Upcasts::default();
        let attr: Attribute = parse_quote!(#[event(upcast(v2 = m::two, v1 = one))]);
        attr::for_each_key(&[attr], "event", &mut errors, |errors, meta| {
            upcasts.parse(errors, &meta)
        });
        let out: Vec<String> = upcasts
            .expand("Deposited")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(errors.finish().is_ok());
        assert_eq!(out.len(), 2);
        assert!(
            out[0].starts_with(
                r#":: std :: sync :: Arc :: new (:: esframe_core :: upcast :: upcaster ("Deposited" , 1u32 ,"#
            ),
            "{out:?}"
        );
        assert!(out[0].contains("= one ;"), "{out:?}");
        assert!(
            out[1].contains(", 2u32 ,") && out[1].contains("= m :: two ;"),
            "{out:?}"
        );
    }
}
