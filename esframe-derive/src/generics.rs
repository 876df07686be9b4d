//! Generic parameters: what the derives support and the bounds they add.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::{Generics, Type, WherePredicate, parse_quote};

/// Reports every lifetime parameter of `generics` on the lifetime, with `reason` as the message:
/// the esframe traits require `'static` types.
pub(crate) fn reject_lifetimes(
    generics: &Generics,
    errors: &mut crate::errors::Errors,
    reason: &str,
) {
    for param in generics.lifetimes() {
        errors.spanned(&param.lifetime, reason);
    }
}

/// `generics` with `predicates` added to its `where` clause.
pub(crate) fn with_predicates(
    generics: &Generics,
    predicates: impl IntoIterator<Item = WherePredicate>,
) -> Generics {
    let mut generics = generics.clone();
    generics.make_where_clause().predicates.extend(predicates);
    generics
}

/// The generics of a fallback impl (emitted next to errors so that code using the type reports
/// nothing more): the supertraits every esframe trait has, behind a `for<'__esframe>` binder so
/// that the bound is never a "trivial bound" error of its own.
pub(crate) fn fallback_generics(generics: &Generics) -> Generics {
    with_predicates(
        generics,
        [parse_quote! {
            for<'__esframe> Self: ::core::marker::Send + ::core::marker::Sync + 'static
        }],
    )
}

/// Whether `ty` mentions one of the type or const parameters of `generics`, in which case a
/// bound on `ty` belongs in the impl's `where` clause (a bound on a concrete type that does not
/// hold would be a "trivial bound" error rather than a helpful one).
pub(crate) fn mentions_params(ty: &Type, generics: &Generics) -> bool {
    let params: Vec<String> = generics
        .type_params()
        .map(|param| param.ident.to_string())
        .chain(generics.const_params().map(|param| param.ident.to_string()))
        .collect();
    fn walk(tokens: TokenStream, params: &[String]) -> bool {
        tokens.into_iter().any(|token| match token {
            TokenTree::Ident(ident) => params.iter().any(|param| ident == param),
            TokenTree::Group(group) => walk(group.stream(), params),
            _ => false,
        })
    }
    !params.is_empty() && walk(ty.to_token_stream(), &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_generic_parameters_in_types() {
        let generics: Generics = parse_quote!(<'a, T, const N: usize>);
        assert!(mentions_params(&parse_quote!(Vec<T>), &generics));
        assert!(mentions_params(&parse_quote!([u8; N]), &generics));
        assert!(mentions_params(&parse_quote!(<T as Tr>::Id), &generics));
        assert!(!mentions_params(&parse_quote!(Vec<Tee>), &generics));
        assert!(!mentions_params(&parse_quote!(T), &parse_quote!(<'a>)));
    }

    #[test]
    fn adds_predicates_after_the_users_own() {
        let generics: Generics = parse_quote!(<T: Clone>);
        let generics = Generics {
            where_clause: Some(parse_quote!(where T: Default,)),
            ..generics
        };
        let generics = with_predicates(&generics, [parse_quote!(T: Send)]);
        let where_clause = generics.where_clause.to_token_stream().to_string();
        assert_eq!(where_clause, "where T : Default , T : Send");
    }
}
