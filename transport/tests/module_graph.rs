//! transport's modules import each other without a cycle (see `devtools/module_graph`, which
//! the cli crate can call the same way on `cli/src`).

#[test]
fn transport_modules_have_no_import_cycle() {
    module_graph::assert_acyclic(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
}
