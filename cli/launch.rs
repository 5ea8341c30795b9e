//! `dtrain launch`: start N local ranks of this program (being written).

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Number of ranks to start on this host
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Training flags passed to every rank
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TRAIN FLAGS"
    )]
    pub rest: Vec<std::ffi::OsString>,
}

#[derive(Args, Debug, Clone)]
pub struct TestChildArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<std::ffi::OsString>,
}
