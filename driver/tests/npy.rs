//! The `.npy`/`.npz` reader (npyz and zip underneath) on what numpy writes: both byte orders,
//! Fortran order, every supported dtype, stored and deflated archives; bad input is an error.

mod common;

use common::npy;
use nibble_driver::calibrate::npy::{parse_npy, parse_npz, DType};
use std::io::Write;

fn npz(members: &[(&str, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in members {
        zip.start_file(*name, zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

#[test]
fn reads_both_byte_orders_and_fortran_order() {
    let values = [1.5f32, -2.0, 3.25, 4.0, 5.5, -6.0];
    let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let be: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    let a = parse_npy("le", &npy("<f4", false, "(2, 3)", &le)).unwrap();
    let b = parse_npy("be", &npy(">f4", false, "(2, 3)", &be)).unwrap();
    assert_eq!((a.dtype, a.shape.clone()), (DType::F32, vec![2, 3]));
    assert_eq!(a.as_f32().unwrap(), values);
    assert_eq!(a, b);
    // Fortran order: memory holds columns; the reader returns C order.
    let columns = [1.5f32, 4.0, -2.0, 5.5, 3.25, -6.0];
    let f: Vec<u8> = columns.iter().flat_map(|v| v.to_le_bytes()).collect();
    let c = parse_npy("f", &npy("<f4", true, "(2, 3)", &f)).unwrap();
    assert_eq!(c.as_f32().unwrap(), values);
}

#[test]
fn reads_every_supported_dtype() {
    let cases: Vec<(&str, Vec<u8>, DType, Vec<f64>)> = vec![
        (
            "<f2",
            [1.0f32, -0.5].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            DType::F16,
            vec![1.0, -0.5],
        ),
        ("<f8", [0.25f64, 7.0].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::F64, vec![0.25, 7.0]),
        ("|i1", vec![0xff, 3], DType::I8, vec![-1.0, 3.0]),
        ("|u1", vec![0xff, 3], DType::U8, vec![255.0, 3.0]),
        ("<i2", [-7i16, 9].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::I16, vec![-7.0, 9.0]),
        ("<u2", [7u16, 9].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::U16, vec![7.0, 9.0]),
        ("<i4", [-70i32, 90].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::I32, vec![-70.0, 90.0]),
        ("<u4", [70u32, 90].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::U32, vec![70.0, 90.0]),
        (">i8", [-700i64, 900].iter().flat_map(|v| v.to_be_bytes()).collect(), DType::I64, vec![-700.0, 900.0]),
        ("<u8", [700u64, 900].iter().flat_map(|v| v.to_le_bytes()).collect(), DType::U64, vec![700.0, 900.0]),
        ("|b1", vec![1, 0], DType::Bool, vec![1.0, 0.0]),
    ];
    for (descr, data, dtype, want) in cases {
        let a = parse_npy(descr, &npy(descr, false, "(2,)", &data)).unwrap_or_else(|e| panic!("{descr}: {e}"));
        assert_eq!((a.dtype, a.shape.clone()), (dtype, vec![2]), "{descr}");
        assert_eq!(a.to_f64(), want, "{descr}");
    }
}

#[test]
fn reads_stored_and_deflated_archives() {
    let x: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let ids: Vec<u8> = [5i64, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
    let members = [("x.npy", npy("<f4", false, "(3,)", &x)), ("input_ids.npy", npy("<i8", false, "(1, 2)", &ids))];
    for method in [zip::CompressionMethod::Stored, zip::CompressionMethod::Deflated] {
        let arrays = parse_npz("a.npz", &npz(&members, method)).unwrap();
        let names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x", "input_ids"], "{method:?}");
        assert_eq!(arrays[0].1.as_f32().unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(arrays[1].1.as_i64().unwrap(), [5, 6]);
        assert_eq!(arrays[1].1.shape, [1, 2]);
    }
}

#[test]
fn bad_input_is_an_error_naming_the_array() {
    let four = 1.0f32.to_le_bytes();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not an array".to_vec(), "magic"),
        (npy("<f4", false, "(2, 3)", &four), "data has 4 bytes, the header declares 24"),
        (npy("<c8", false, "(1,)", &[0; 8]), "unsupported dtype"),
        (npy("<f4", false, "(99999999999, 99999999999, 99999999999)", &four), "more elements than"),
        (npy("<f4", false, &format!("{}1,{}", "(".repeat(40), ")".repeat(40)), &four), "nests too deeply"),
        (npy("<f4", false, "oops", &four), "bad.npy"),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec(), "truncated header"),
    ];
    for (bytes, want) in cases {
        let e = parse_npy("bad.npy", &bytes).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains(want), "{want}: {e}");
    }
    let e = parse_npz("bad.npz", b"PK\x03\x04 truncated").unwrap_err().to_string();
    assert!(e.contains("bad.npz") && e.contains("not a readable .npz archive"), "{e}");
}
