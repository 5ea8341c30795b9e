//! `dtrain plot` (being written).

use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    #[arg(long, value_name = "FILE")]
    pub metrics: PathBuf,
    #[arg(long, value_name = "FILE.svg")]
    pub out: PathBuf,
}
