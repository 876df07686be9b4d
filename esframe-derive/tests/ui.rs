//! Compile-time tests of the derives: `ui/pass` must compile and run, `ui/fail` must fail to
//! compile with exactly the committed `.stderr`. Regenerate the `.stderr` files with
//! `TRYBUILD=overwrite cargo test -p esframe-derive --test ui` and read the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
