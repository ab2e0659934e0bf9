//! DataFrame helpers shared by the metrics, sweep and chart code: columns built from rows, typed
//! column reads with errors that name the column, and atomic CSV writes.

use std::path::Path;

use polars::prelude::{
    ChunkedArray, Column, CsvWriter, DataFrame, DataType, Float64Type, NamedFrom, SerWriter, Series,
};

use crate::error::{Error, Result};
use crate::io;

/// A column named `name` holding `get` of every row.
pub(crate) fn column<R, V>(name: &str, rows: &[R], get: impl Fn(&R) -> V) -> Column
where
    Series: NamedFrom<Vec<V>, [V]>,
{
    Column::new(name.into(), rows.iter().map(get).collect::<Vec<V>>())
}

/// A DataFrame with one column per named field of `rows`' items, in the order given:
/// `frame_of!(rows; phase, epoch, lr)`.
macro_rules! frame_of {
    ($rows:expr; $($field:ident),+ $(,)?) => {{
        let rows = $rows;
        let columns = vec![$(
            $crate::frame::column(stringify!($field), rows, |r| ToOwned::to_owned(&r.$field))
        ),+];
        $crate::frame::from_columns(rows.len(), columns)
    }};
}
pub(crate) use frame_of;

/// A frame of equally long columns.
pub(crate) fn from_columns(height: usize, columns: Vec<Column>) -> DataFrame {
    DataFrame::new(height, columns).expect("columns of equal length")
}

/// Column `name` of `frame` as f64 (integers are cast); `what` names the frame in errors.
pub(crate) fn f64_column(
    frame: &DataFrame,
    name: &str,
    what: &str,
) -> Result<ChunkedArray<Float64Type>> {
    let err = |e: polars::error::PolarsError| Error::value(what, e);
    let column = frame.column(name).map_err(err)?;
    let cast = column.cast(&DataType::Float64).map_err(err)?;
    Ok(cast.f64().map_err(err)?.clone())
}

/// Column `name` of `frame` as strings.
pub(crate) fn str_column(frame: &DataFrame, name: &str, what: &str) -> Result<Vec<Option<String>>> {
    let err = |e: polars::error::PolarsError| Error::value(what, e);
    let column = frame.column(name).map_err(err)?.str().map_err(err)?;
    Ok(column.iter().map(|s| s.map(str::to_string)).collect())
}

/// Writes a DataFrame as CSV, atomically.
pub fn write_frame_csv(frame: &DataFrame, path: &Path) -> Result<()> {
    let mut frame = frame.clone();
    let mut bytes = Vec::new();
    CsvWriter::new(&mut bytes)
        .finish(&mut frame)
        .map_err(|e| Error::file(path, e))?;
    io::write_atomic(path, &bytes)
}
