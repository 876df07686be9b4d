//! `#[derive(ProjectionEvents)]`: an enum with one variant per aggregate, each holding that
//! aggregate's event type, read by a typed projection.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::{
    Data, DeriveInput, Fields, Ident, LitStr, Token, Type, meta::ParseNestedMeta, spanned::Spanned,
};

use crate::{
    attr::{self, Setting},
    errors::Errors,
    generics,
};

/// Expands `#[derive(ProjectionEvents)]`: the impl, or the errors and a fallback impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::new();
    let model = UnionEnum::from_syn(input, &mut errors);
    errors.expand_or_fallback(model, |model| model.expand(), || fallback(input))
}

/// A validated enum over several aggregates' events.
struct UnionEnum<'a> {
    ident: &'a Ident,
    variants: Vec<UnionVariant<'a>>,
}

/// One variant: one aggregate and the event type its events decode as.
struct UnionVariant<'a> {
    ident: &'a Ident,
    aggregate: AggregateRef,
    /// The variant's one field.
    inner: &'a Type,
}

/// The value of `#[events(aggregate = ...)]`.
enum AggregateRef {
    /// A type implementing `Aggregate`: its `TYPE`.
    Type(Box<Type>),
    /// The aggregate type name as written.
    Name(LitStr),
}

impl AggregateRef {
    /// Where the user wrote it, for the errors about it.
    fn span(&self) -> Span {
        match self {
            Self::Type(ty) => ty.span(),
            Self::Name(lit) => lit.span(),
        }
    }
}

const KEYS: &[&str] = &["aggregate"];
const EXPECTED: &str = "`aggregate = Type` or `aggregate = \"name\"`";
const EXAMPLE: &str = "e.g. `#[events(aggregate = Order)]` or `#[events(aggregate = \"order\")]`";

impl<'a> UnionEnum<'a> {
    /// Parses and validates the input, recording every mistake in `errors`.
    fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Option<Self> {
        let what = "`#[derive(ProjectionEvents)]` expects an enum with one variant per aggregate, \
                    each holding that aggregate's event type, e.g. \
                    `enum ShopEvent { #[events(aggregate = Order)] Order(OrderEvent) }`";
        let data = match &input.data {
            Data::Enum(data) => Some(data),
            Data::Struct(data) => {
                errors.spanned(data.struct_token, what);
                None
            }
            Data::Union(data) => {
                errors.spanned(data.union_token, what);
                None
            }
        };
        if !input.generics.params.is_empty() {
            errors.spanned(
                &input.generics,
                "`#[derive(ProjectionEvents)]` does not support generic parameters: remove them \
                 and hold each aggregate's event type as a concrete type, e.g. `Order(OrderEvent)`",
            );
        }
        attr::reject_attrs(
            &input.attrs,
            "events",
            errors,
            "the type: write `#[events(aggregate = ...)]` on each variant",
        );

        let data = data?;
        if data.variants.is_empty() {
            errors.spanned(
                &input.ident,
                format_args!(
                    "`{}` has no variants: add one per aggregate, e.g. \
                     `#[events(aggregate = Order)] Order(OrderEvent)`",
                    input.ident
                ),
            );
        }
        let mut variants = Vec::new();
        for variant in &data.variants {
            for field in &variant.fields {
                attr::reject_attrs(
                    &field.attrs,
                    "events",
                    errors,
                    "a field: write `#[events(aggregate = ...)]` on the variant",
                );
            }
            let inner = match &variant.fields {
                Fields::Unnamed(fields) if fields.unnamed.len() == 1 => Some(&fields.unnamed[0].ty),
                fields => {
                    let message = format!(
                        "variant `{0}` must hold its aggregate's event type as its one field: \
                         write it as `{0}({0}Event)`",
                        variant.ident
                    );
                    match fields {
                        Fields::Unit => errors.spanned(&variant.ident, message),
                        _ => errors.spanned(fields, message),
                    }
                    None
                }
            };
            let aggregate = parse_aggregate(variant, errors);
            if let (Some(inner), Some(aggregate)) = (inner, aggregate) {
                variants.push(UnionVariant {
                    ident: &variant.ident,
                    aggregate,
                    inner,
                });
            }
        }
        let model = Self {
            ident: &input.ident,
            variants,
        };
        model.validate(errors);
        Some(model)
    }

    /// An aggregate type name is read by one variant: a second use is reported on it, naming
    /// the first. (Names given as types are compared when the impl is compiled.)
    fn validate(&self, errors: &mut Errors) {
        for (index, variant) in self.variants.iter().enumerate() {
            let AggregateRef::Name(name) = &variant.aggregate else {
                continue;
            };
            let first = self.variants[..index].iter().find(|other| {
                matches!(&other.aggregate, AggregateRef::Name(other) if other.value() == name.value())
            });
            if let Some(first) = first {
                errors.spanned(
                    name,
                    format_args!(
                        "aggregate type `{}` is already read by variant `{}`: each aggregate's \
                         events go in one variant, remove one of them",
                        name.value(),
                        first.ident
                    ),
                );
            }
        }
    }

    fn expand(&self) -> TokenStream {
        let ident = self.ident;
        let private = quote!(::esframe_core::__private);
        let str_ty = quote!(&'static ::core::primitive::str);
        let aggregate_consts: Vec<Ident> = (0..self.variants.len())
            .map(|index| format_ident!("__ESFRAME_AGGREGATE_{}", index))
            .collect();
        let events_consts: Vec<Ident> = (0..self.variants.len())
            .map(|index| format_ident!("__ESFRAME_EVENTS_{}", index))
            .collect();

        // One `const` per variant for its aggregate type name and one for its event type's
        // calls, each spanned on what the user wrote: a type that is not an `Aggregate` or an
        // `Event` is one error there, and the impl's bodies need no bound.
        let consts = self.variants.iter().enumerate().map(|(index, variant)| {
            let aggregate_const = &aggregate_consts[index];
            let events_const = &events_consts[index];
            let aggregate = match &variant.aggregate {
                AggregateRef::Type(ty) => quote_spanned! {ty.span()=>
                    #private::aggregate_type::<#ty>()
                },
                AggregateRef::Name(lit) => quote!(#lit),
            };
            let inner = variant.inner;
            let events = quote_spanned! {inner.span()=>
                #private::projection_variant::<#inner>()
            };
            quote! {
                const #aggregate_const: #str_ty = #aggregate;
                const #events_const: #private::ProjectionVariant<#inner> = #events;
            }
        });
        let consts: Vec<TokenStream> = consts.collect();

        // Two variants must not read the same aggregate type: names given as types are only
        // known to the compiler, so the check is a `const` evaluated by it, spanned on the
        // second variant's aggregate.
        let mut distinct = Vec::new();
        for (index, variant) in self.variants.iter().enumerate() {
            for (first_index, first) in self.variants[..index].iter().enumerate() {
                if matches!(
                    (&first.aggregate, &variant.aggregate),
                    (AggregateRef::Name(_), AggregateRef::Name(_))
                ) {
                    continue; // compared by the derive
                }
                let message = format!(
                    "variants `{}` and `{}` of `{ident}` read the same aggregate type: each \
                     aggregate's events go in one variant, remove one of them",
                    first.ident, variant.ident
                );
                let message = LitStr::new(&message, Span::call_site());
                let (first_const, this_const) =
                    (&aggregate_consts[first_index], &aggregate_consts[index]);
                distinct.push(quote_spanned! {variant.aggregate.span()=>
                    const _: () = if #private::same_str(#first_const, #this_const) {
                        ::core::panic!(#message)
                    };
                });
            }
        }

        let event_types = events_consts
            .iter()
            .map(|events| quote!((#events.event_types)()));
        let decode_arms = self.variants.iter().enumerate().map(|(index, variant)| {
            let variant_ident = variant.ident;
            let (aggregate_const, events_const) = (&aggregate_consts[index], &events_consts[index]);
            quote! {
                if aggregate_type == #aggregate_const {
                    return ::core::result::Result::map(
                        (#events_const.decode)(event),
                        |decoded| ::core::option::Option::map(decoded, Self::#variant_ident),
                    );
                }
            }
        });

        quote! {
            const _: () = {
                #(#consts)*
                #(#distinct)*

                #[automatically_derived]
                impl ::esframe_core::projection::ProjectionEvents for #ident {
                    fn interest() -> ::esframe_core::projection::Interest {
                        #private::union_interest(
                            &[#(#aggregate_consts),*],
                            &[#(#event_types),*],
                        )
                    }

                    fn decode(
                        event: &::esframe_core::RecordedEvent,
                    ) -> ::core::result::Result<
                        ::core::option::Option<Self>,
                        ::esframe_core::EventDecodeError,
                    > {
                        let aggregate_type = event.aggregate_type();
                        #(#decode_arms)*
                        ::core::result::Result::Ok(::core::option::Option::None)
                    }
                }
            };
        }
    }
}

/// Reads the `#[events(...)]` attributes of `variant`: its aggregate, or `None` after reporting
/// why not. A variant without the key is reported on its name, unless an attribute of it
/// already was (a misspelled or unknown key is the attempt at writing it).
fn parse_aggregate(variant: &syn::Variant, errors: &mut Errors) -> Option<AggregateRef> {
    let mut aggregate = Setting::default();
    let mut reported = false;
    for attr in variant
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("events"))
    {
        let result = attr.parse_nested_meta(|meta| {
            let Some(key) = attr::key(errors, &meta, "events", KEYS, EXPECTED)? else {
                reported = true;
                return Ok(());
            };
            let mut sink = Errors::new();
            let errors = key.errors(errors, &mut sink);
            let value = aggregate_value(errors, &meta)?;
            aggregate.set(errors, "events", &key, value);
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
            reported = true;
        }
    }
    if !aggregate.is_present() && !reported {
        errors.spanned(
            &variant.ident,
            format_args!(
                "variant `{}` needs `#[events(aggregate = ...)]`: the aggregate whose events it \
                 holds, as its type or its type name, {EXAMPLE}",
                variant.ident
            ),
        );
    }
    aggregate.into_value()
}

/// Reads `aggregate = Type` or `aggregate = "name"`; reports anything else on the value and
/// returns `None`.
fn aggregate_value(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
) -> syn::Result<Option<AggregateRef>> {
    let key = attr::path_to_string(&meta.path);
    if meta.input.is_empty() || meta.input.peek(Token![,]) {
        errors.spanned(
            &meta.path,
            format_args!("`{key}` needs a value: the aggregate's type or its type name, {EXAMPLE}"),
        );
        return Ok(None);
    }
    let fork = meta.input.fork();
    let _ = fork.parse::<Token![=]>();
    if fork.peek(LitStr) {
        return Ok(attr::name(errors, meta, "order")?.map(AggregateRef::Name));
    }
    let input = meta.value()?;
    let fork = input.fork();
    if fork.parse::<Type>().is_ok() && (fork.is_empty() || fork.peek(Token![,])) {
        return Ok(Some(AggregateRef::Type(Box::new(input.parse()?))));
    }
    let mut value = TokenStream::new();
    while !input.is_empty() && !input.peek(Token![,]) {
        value.extend([input.parse::<TokenTree>()?]);
    }
    errors.spanned(
        value,
        format_args!(
            "`{key}` must be a type implementing `Aggregate` or the aggregate type name as a \
             string literal, {EXAMPLE}"
        ),
    );
    Ok(None)
}

/// An impl whose bodies never run, emitted with the errors so that code using the type as a
/// typed projection's events reports nothing more.
fn fallback(input: &DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let generics = generics::fallback_generics(&input.generics);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let unreachable = quote!(::core::panic!("`#[derive(ProjectionEvents)]` failed"));
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics ::esframe_core::projection::ProjectionEvents
                for #ident #ty_generics #where_clause
            {
                fn interest() -> ::esframe_core::projection::Interest {
                    #unreachable
                }

                fn decode(
                    _: &::esframe_core::RecordedEvent,
                ) -> ::core::result::Result<
                    ::core::option::Option<Self>,
                    ::esframe_core::EventDecodeError,
                > {
                    #unreachable
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn expand(input: DeriveInput) -> String {
        derive(&input).to_string()
    }

    #[test]
    fn dispatches_on_each_variants_aggregate() {
        let out = expand(parse_quote! {
            enum ShopEvent {
                #[events(aggregate = Order)]
                Order(OrderEvent),
                #[events(aggregate = "inventory")]
                Inventory(inventory::Event),
            }
        });
        assert!(!out.contains("compile_error"), "{out}");
        for expected in [
            "const __ESFRAME_AGGREGATE_0 : & 'static :: core :: primitive :: str = :: esframe_core :: __private :: aggregate_type :: < Order > ()",
            r#"const __ESFRAME_AGGREGATE_1 : & 'static :: core :: primitive :: str = "inventory""#,
            "projection_variant :: < inventory :: Event > ()",
            "same_str (__ESFRAME_AGGREGATE_0 , __ESFRAME_AGGREGATE_1)",
            "if aggregate_type == __ESFRAME_AGGREGATE_1 {",
            "Self :: Inventory",
            "union_interest (& [__ESFRAME_AGGREGATE_0 , __ESFRAME_AGGREGATE_1]",
        ] {
            assert!(out.contains(expected), "missing {expected} in {out}");
        }
        // Two names are compared by the derive, not by the compiler.
        let out = expand(parse_quote! {
            enum E {
                #[events(aggregate = "a")]
                A(AEvent),
                #[events(aggregate = "b")]
                B(BEvent),
            }
        });
        assert!(!out.contains("same_str"), "{out}");
    }

    #[test]
    fn a_misspelled_key_is_one_error_and_still_read() {
        let out = expand(parse_quote! {
            enum E {
                #[events(agregate = "a")]
                A(AEvent),
                #[events(colour = "red")]
                B(BEvent),
                #[events(aggregate)]
                C(CEvent),
                #[events(aggregate = 5)]
                D(DEvent),
            }
        });
        assert_eq!(out.matches("compile_error").count(), 4, "{out}");
        assert!(out.contains("did you mean `aggregate`?"), "{out}");
        assert!(!out.contains("needs `#[events"), "{out}");
    }

    #[test]
    fn reports_every_mistake_and_still_emits_an_impl() {
        let out = expand(parse_quote! {
            #[events(aggregate = "x")]
            enum E<T> {
                #[events(aggregate = "a")]
                A(AEvent),
                B { events: BEvent },
                #[events(aggregate = "a")]
                C(CEvent, T),
                D(DEvent),
            }
        });
        // The generics, the attribute on the enum, `B`'s shape and attribute, `C`'s shape,
        // `D`'s attribute.
        assert_eq!(out.matches("compile_error").count(), 6, "{out}");
        assert!(
            out.contains("ProjectionEvents for E < T >"),
            "the fallback impl keeps the generics: {out}"
        );
    }
}
