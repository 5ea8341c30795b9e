//! `dtrain bench` (being written).

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub num_nodes: usize,
}
