//! cli's modules import each other without a cycle (see `devtools/module_graph`): `config` is
//! the leaf every command reads, `command` holds the clap definitions and imports the
//! subcommands' argument structs, never the other way round.

#[test]
fn cli_modules_have_no_import_cycle() {
    module_graph::assert_acyclic(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
}
