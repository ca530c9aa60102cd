//! Claims as a Parquet file, for analysis in pandas, DuckDB or Spark.
//!
//! Rows are buffered into row groups of [`ROW_GROUP`] claims and each group
//! is written as soon as it is full, so memory stays bounded by one group
//! however many claims there are. Strings are UTF-8 (`BYTE_ARRAY (UTF8)`),
//! the claim time a `TIMESTAMP(MILLIS, true)`; pages are Snappy-compressed.

use std::{io::Write, sync::Arc};

use parquet::{
    basic::Compression,
    data_type::{ByteArray, ByteArrayType, Int64Type},
    errors::ParquetError,
    file::{properties::WriterProperties, writer::SerializedFileWriter},
    schema::parser::parse_message_type,
};

use crate::store::{ClaimRow, Store, StoreError};

/// Claims per row group.
pub const ROW_GROUP: usize = 65_536;

const SCHEMA: &str = "
message claim {
    REQUIRED INT64 claim_id;
    REQUIRED BYTE_ARRAY activity_id (UTF8);
    REQUIRED BYTE_ARRAY ticket_id (UTF8);
    REQUIRED BYTE_ARRAY code (UTF8);
    REQUIRED INT64 user_id;
    REQUIRED BYTE_ARRAY username (UTF8);
    REQUIRED BYTE_ARRAY nickname (UTF8);
    REQUIRED BYTE_ARRAY node (UTF8);
    REQUIRED INT64 claimed_at (TIMESTAMP(MILLIS, true));
}";

/// The I/O error itself when there is one (a full disk said so three times,
/// after "External:"s).
fn io(e: ParquetError) -> std::io::Error {
    match e {
        ParquetError::External(inner) => match inner.downcast::<std::io::Error>() {
            Ok(io) => *io,
            Err(other) => std::io::Error::other(other),
        },
        e => std::io::Error::other(e),
    }
}

/// Column buffers of one row group.
#[derive(Default)]
struct Group {
    ids: Vec<i64>,
    strings: [Vec<ByteArray>; 6],
    users: Vec<i64>,
    times: Vec<i64>,
}

impl Group {
    fn push(&mut self, row: ClaimRow) {
        self.ids.push(row.claim_id as i64);
        self.users.push(row.user_id as i64);
        self.times.push(row.claimed_at_ms);
        for (column, value) in self.strings.iter_mut().zip([
            row.activity_id,
            row.ticket_id,
            row.code,
            row.username,
            row.nickname,
            row.node,
        ]) {
            column.push(ByteArray::from(value.into_bytes()));
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn write<W: Write + Send>(&mut self, file: &mut SerializedFileWriter<W>) -> Result<(), ParquetError> {
        let mut group = file.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            match index {
                0 => column.typed::<Int64Type>().write_batch(&self.ids, None, None)?,
                1..=3 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&self.strings[index - 1], None, None)?,
                4 => column.typed::<Int64Type>().write_batch(&self.users, None, None)?,
                5..=7 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&self.strings[index - 2], None, None)?,
                _ => column.typed::<Int64Type>().write_batch(&self.times, None, None)?,
            };
            column.close()?;
            index += 1;
        }
        group.close()?;
        *self = Group::default();
        Ok(())
    }
}

/// Writes every claim of `activity_id` to `out` as Parquet; returns the row count.
pub fn claims<W: Write + Send>(store: &Store, activity_id: &str, out: W) -> Result<u64, StoreError> {
    let wrap = |e: std::io::Error| StoreError::Io {
        what: "cannot write the Parquet export to",
        path: "the output".into(),
        source: e,
    };
    let schema = Arc::new(parse_message_type(SCHEMA).expect("the schema is valid"));
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut file = SerializedFileWriter::new(out, schema, props).map_err(|e| wrap(io(e)))?;
    let mut group = Group::default();
    let n = store.export_claims(activity_id, &mut |row| {
        group.push(row);
        if group.len() >= ROW_GROUP {
            group.write(&mut file).map_err(io)?;
        }
        Ok(())
    })?;
    if group.len() > 0 {
        group.write(&mut file).map_err(|e| wrap(io(e)))?;
    }
    file.close().map_err(|e| wrap(io(e)))?;
    Ok(n)
}
