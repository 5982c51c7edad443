//! Images in: decoding (JPEG, PNG through the `image` crate) and the preprocessing of
//! transformers' image processors, read from `preprocessor_config.json`: resize (PIL's
//! resampling, as torchvision's antialiased resize of 8-bit images reproduces it), center crop,
//! rescale and normalise into `(C, H, W)` f32 values.

use crate::error::{IoError, Result};
use crate::hf::read_json;
use serde_json::Value;
use std::path::Path;

/// An 8-bit RGB image, row-major `(H, W, 3)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// The `Software` text of the PNGs lora-rs writes.
pub const PNG_MARK: &str = "lora-rs";

/// The CRC-32 (IEEE) of `data`, as PNG chunks carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// `png` with a `tEXt` chunk `key`=`value` inserted after its header chunk (IHDR).
fn with_text_chunk(png: &[u8], key: &str, value: &str) -> Vec<u8> {
    // 8-byte signature, then IHDR: 4 length + 4 type + 13 data + 4 CRC.
    let at = 8 + 4 + 4 + 13 + 4;
    let mut body = b"tEXt".to_vec();
    body.extend_from_slice(key.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    let mut out = png[..at].to_vec();
    out.extend_from_slice(&((body.len() - 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out.extend_from_slice(&png[at..]);
    out
}

/// Whether `path` is a PNG lora-rs wrote (its chunks before the image data hold the
/// `Software` = [`PNG_MARK`] text).
pub fn png_is_ours(path: &Path) -> bool {
    use std::io::Read;
    // Never open a FIFO or device (opening one can block).
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return false;
    }
    // The marker sits right after the header: the first 64 KiB are enough.
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(1 << 16).read_to_end(&mut bytes));
    if read.is_err() {
        return false;
    }
    if bytes.len() < 8 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" {
        return false;
    }
    let mut i = 8;
    while i + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
        let kind = &bytes[i + 4..i + 8];
        let Some(data) = bytes.get(i + 8..i + 8 + len) else {
            return false;
        };
        if kind == b"tEXt" {
            let mut want = b"Software\0".to_vec();
            want.extend_from_slice(PNG_MARK.as_bytes());
            if data == want.as_slice() {
                return true;
            }
        }
        if kind == b"IDAT" || kind == b"IEND" {
            return false;
        }
        i += 12 + len;
    }
    false
}

/// The largest image side decoded (a header claiming more is refused before any allocation).
pub const MAX_SIDE: u32 = 16_384;

impl Rgb8 {
    /// An image of `(height, width)` from its bytes; the length is checked.
    pub fn new(height: usize, width: usize, data: Vec<u8>) -> Option<Self> {
        (data.len() == height * width * 3).then_some(Self {
            height,
            width,
            data,
        })
    }

    /// The `(height, width)` in a JPEG or PNG file's header, checked as [`Rgb8::open`] checks
    /// it, without decoding the pixels.
    pub fn probe(path: &Path) -> Result<(usize, usize)> {
        let reader = image::ImageReader::open(path)
            .map_err(crate::error::io_err(path))?
            .with_guessed_format()
            .map_err(crate::error::io_err(path))?;
        let (w, h) = reader.into_dimensions().map_err(|e| IoError::Image {
            path: path.into(),
            reason: format!("cannot read the header: {e}"),
        })?;
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(IoError::Image {
                path: path.into(),
                reason: format!("{w}x{h} pixels: each side must be from 1 to {MAX_SIDE}"),
            });
        }
        Ok((h as usize, w as usize))
    }

    /// Decodes a JPEG or PNG file (grayscale and alpha converted to RGB as PIL's
    /// `convert("RGB")` does). A file that is not an image, a truncated one, or one larger
    /// than [`MAX_SIDE`] on a side is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |reason: String| IoError::Image {
            path: path.into(),
            reason,
        };
        let reader = image::ImageReader::open(path)
            .map_err(crate::error::io_err(path))?
            .with_guessed_format()
            .map_err(crate::error::io_err(path))?;
        drop(reader);
        Self::probe(path)?;
        let mut reader = image::ImageReader::open(path)
            .map_err(crate::error::io_err(path))?
            .with_guessed_format()
            .map_err(crate::error::io_err(path))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        reader.limits(limits);
        let img = reader
            .decode()
            .map_err(|e| err(format!("cannot decode: {e}")))?
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        Ok(Self {
            height: h,
            width: w,
            data: img.into_raw(),
        })
    }

    /// Writes the image as a PNG marked as lora-rs's (a `tEXt` chunk `Software` =
    /// [`PNG_MARK`]), so that `--force` may later replace it and nothing else.
    pub fn save_png_marked(&self, path: &Path) -> Result<()> {
        let bytes = self.png_bytes(path)?;
        crate::write::write_atomic(path, &with_text_chunk(&bytes, "Software", PNG_MARK))
    }

    fn png_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                &self.data,
                self.width as u32,
                self.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| IoError::Image {
                path: path.into(),
                reason: format!("cannot encode: {e}"),
            })?;
        Ok(bytes)
    }

    /// Writes the image as a PNG.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                &self.data,
                self.width as u32,
                self.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| IoError::Image {
                path: path.into(),
                reason: format!("cannot encode: {e}"),
            })?;
        crate::write::write_atomic(path, &bytes)
    }

    /// The image mirrored left to right.
    pub fn flip_horizontal(&self) -> Self {
        let mut data = Vec::with_capacity(self.data.len());
        for row in self.data.chunks_exact(self.width * 3) {
            for px in row.chunks_exact(3).rev() {
                data.extend_from_slice(px);
            }
        }
        Self { data, ..*self }
    }

    /// The `(h, w)` window at `(top, left)`; parts outside the image are black (torchvision's
    /// center crop pads with zeros when the crop is larger).
    pub fn crop(&self, top: isize, left: isize, h: usize, w: usize) -> Self {
        let mut data = vec![0u8; h * w * 3];
        for y in 0..h {
            let sy = top + y as isize;
            if sy < 0 || sy >= self.height as isize {
                continue;
            }
            for x in 0..w {
                let sx = left + x as isize;
                if sx < 0 || sx >= self.width as isize {
                    continue;
                }
                let s = (sy as usize * self.width + sx as usize) * 3;
                data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&self.data[s..s + 3]);
            }
        }
        Self {
            height: h,
            width: w,
            data,
        }
    }
}

use image::ImageEncoder;

/// A resampling filter (`resample` in a processor config: PIL's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// 2: bilinear (a triangle of support 1).
    Bilinear,
    /// 3: bicubic (Keys' cubic, a = -0.5, support 2).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point bits of the 8-bit resampling weights (PIL's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's per-output-pixel taps for resizing `input` samples to `output`: `(first, weights)`,
/// the weights in fixed point. Downscaling widens the filter by the scale (antialiasing).
fn taps(input: usize, output: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as isize).max(0) as usize;
            let hi = ((center + support + 0.5) as isize)
                .min(input as isize)
                .max(0) as usize;
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| filter.eval((i as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let fixed = w
                .iter()
                .map(|v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    (if s < 0.0 { s - 0.5 } else { s + 0.5 }) as i32
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `(h, w)` as PIL's `Image.resize` does for 8-bit RGB: two separable passes, each
/// rounded to 8 bits, in Pillow 13's order (the vertical pass first when the height shrinks by
/// more than twice as many pixels as the width; horizontal first otherwise, and always before
/// Pillow 13). That is what transformers' image processors compute through PIL; torchvision's
/// antialiased resize of `uint8` tensors reproduces it within a level.
pub fn resize(img: &Rgb8, h: usize, w: usize, filter: Filter) -> Rgb8 {
    let (dh, dw) = (img.height as i64 - h as i64, img.width as i64 - w as i64);
    if dh > 0 && dh > dw * 2 {
        let v = resize_vertical(img, h, filter);
        return resize_horizontal(&v, w, filter);
    }
    let x = resize_horizontal(img, w, filter);
    resize_vertical(&x, h, filter)
}

fn resize_horizontal(img: &Rgb8, w: usize, filter: Filter) -> Rgb8 {
    let mut cur = img.clone();
    if w != cur.width {
        let t = taps(cur.width, w, filter);
        let mut data = vec![0u8; cur.height * w * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (x, (lo, k)) in t.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = 1i64 << (PRECISION_BITS - 1);
                    for (j, &kv) in k.iter().enumerate() {
                        acc += row[(lo + j) * 3 + c] as i64 * kv as i64;
                    }
                    data[(y * w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = Rgb8 {
            height: cur.height,
            width: w,
            data,
        };
    }
    cur
}

fn resize_vertical(img: &Rgb8, h: usize, filter: Filter) -> Rgb8 {
    let mut cur = img.clone();
    if h != cur.height {
        let t = taps(cur.height, h, filter);
        let stride = cur.width * 3;
        let mut data = vec![0u8; h * stride];
        for (y, (lo, k)) in t.iter().enumerate() {
            for i in 0..stride {
                let mut acc = 1i64 << (PRECISION_BITS - 1);
                for (j, &kv) in k.iter().enumerate() {
                    acc += cur.data[(lo + j) * stride + i] as i64 * kv as i64;
                }
                data[y * stride + i] = clip8(acc);
            }
        }
        cur = Rgb8 {
            height: h,
            width: cur.width,
            data,
        };
    }
    cur
}

/// How an image processor sizes its input.
#[derive(Clone, Debug, PartialEq)]
pub enum Resize {
    /// To exactly `(height, width)` (ViT).
    Exact(usize, usize),
    /// The shorter side to `edge / crop_pct` (aspect kept), then a centred `edge x edge` crop;
    /// for `edge >= 384` straight to `edge x edge` (ConvNeXT's and ResNet's processor).
    ShortestEdgeCrop {
        /// `size.shortest_edge`
        edge: usize,
        /// `crop_pct` (f64, as Python divides by it)
        crop_pct: f64,
    },
    /// YOLOS's processor: the aspect ratio kept, the shorter side to `shortest` unless the
    /// longer would pass `longest` (then the longer to about `longest`), both sides floored to
    /// multiples of 16; a batch is then padded (bottom and right) to its largest image.
    ShortestLongest {
        /// `size.shortest_edge`
        shortest: usize,
        /// `size.longest_edge`
        longest: usize,
    },
}

/// The `(height, width)` YOLOS's processor resizes an `(h, w)` image to
/// (`get_size_with_aspect_ratio_yolos` in transformers, its float steps in f64 and Python's
/// round-half-to-even); `None` when a side would be 0 (an image under 16 pixels).
pub fn yolos_size(
    (h, w): (usize, usize),
    shortest: usize,
    longest: usize,
) -> Option<(usize, usize)> {
    let mut size = shortest as f64;
    let (hf, wf) = (h as f64, w as f64);
    let mut raw: Option<f64> = None;
    let (lo, hi) = (hf.min(wf), hf.max(wf));
    if hi / lo * size > longest as f64 {
        let r = longest as f64 * lo / hi;
        raw = Some(r);
        size = r.round_ties_even();
    }
    let (oh, ow) = if w < h {
        let ow = size;
        let oh = match raw {
            Some(r) => (r * hf / wf).trunc(),
            None => (size * hf / wf).trunc(),
        };
        (oh, ow)
    } else if (h <= w && hf == size) || (w <= h && wf == size) {
        (hf, wf)
    } else {
        let ow = match raw {
            Some(r) => (r * wf / hf).trunc(),
            None => (size * wf / hf).trunc(),
        };
        (size, ow)
    };
    let (oh, ow) = (oh as usize, ow as usize);
    let (oh, ow) = (oh - oh % 16, ow - ow % 16);
    (oh > 0 && ow > 0).then_some((oh, ow))
}

/// An image processor's settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Resizing (`do_resize: false`: none).
    pub resize: Option<Resize>,
    /// `resample`
    pub filter: Filter,
    /// `rescale_factor` when `do_rescale`.
    pub rescale: Option<f32>,
    /// `(image_mean, image_std)` when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// ImageNet's "standard" mean and std (0.5), ViT's processor default.
pub const IMAGENET_STANDARD: ([f32; 3], [f32; 3]) = ([0.5; 3], [0.5; 3]);
/// ImageNet's "default" statistics, ResNet's / ConvNeXT's processor default.
pub const IMAGENET_DEFAULT: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

impl ImageProcessor {
    /// `ViTImageProcessor`'s defaults for `(h, w)` inputs.
    pub fn vit(h: usize, w: usize) -> Self {
        Self {
            resize: Some(Resize::Exact(h, w)),
            filter: Filter::Bilinear,
            rescale: Some(1.0 / 255.0),
            normalize: Some(IMAGENET_STANDARD),
        }
    }

    /// What ResNet checkpoints' `preprocessor_config.json` says (`microsoft/resnet-50`: a
    /// `ConvNextImageProcessor` with shortest edge `edge`, `crop_pct` 0.875, bicubic, ImageNet's
    /// statistics): used for a ResNet directory without that file.
    pub fn convnext(edge: usize) -> Self {
        Self {
            resize: Some(Resize::ShortestEdgeCrop {
                edge,
                crop_pct: 224.0 / 256.0,
            }),
            filter: Filter::Bicubic,
            rescale: Some(1.0 / 255.0),
            normalize: Some(IMAGENET_DEFAULT),
        }
    }

    /// `ConvNextImageProcessor`'s class defaults (what a `preprocessor_config.json` leaves out
    /// takes): shortest edge 384, `crop_pct` 224/256, bicubic, mean and std 0.5.
    pub fn convnext_class() -> Self {
        Self {
            resize: Some(Resize::ShortestEdgeCrop {
                edge: 384,
                crop_pct: 224.0 / 256.0,
            }),
            filter: Filter::Bicubic,
            rescale: Some(1.0 / 255.0),
            normalize: Some(IMAGENET_STANDARD),
        }
    }

    /// Reads `preprocessor_config.json`; fields it leaves out take `defaults`' values (the
    /// processor class's defaults).
    pub fn from_file(path: &Path, defaults: &ImageProcessor) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_json(path, &v, defaults)
    }

    /// Parses a processor config value (`path` only names it in errors).
    pub fn from_json(path: &Path, v: &Value, defaults: &ImageProcessor) -> Result<Self> {
        let err = |field: &str, reason: String| IoError::Config {
            path: path.into(),
            field: field.into(),
            reason,
        };
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let flag = |k: &str, default: bool| -> Result<bool> {
            match get(k) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(err(k, format!("expected true or false, got {x}"))),
            }
        };
        let size_of = |x: &Value| -> Result<usize> {
            x.as_u64()
                .filter(|&n| (1..=MAX_SIDE as u64).contains(&n))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    err(
                        "size",
                        format!("expected a size from 1 to {MAX_SIDE}, got {x}"),
                    )
                })
        };
        let mut out = defaults.clone();
        if let Some(t) = get("image_processor_type").and_then(Value::as_str) {
            if !matches!(
                t,
                "ViTImageProcessor"
                    | "ViTImageProcessorFast"
                    | "ConvNextImageProcessor"
                    | "ConvNextImageProcessorFast"
                    | "ViTFeatureExtractor"
                    | "ConvNextFeatureExtractor"
                    | "YolosImageProcessor"
                    | "YolosImageProcessorFast"
                    | "YolosImageProcessorPil"
                    | "YolosFeatureExtractor"
            ) {
                return Err(err(
                    "image_processor_type",
                    format!(
                        "{t:?} is not supported (ViTImageProcessor, ConvNextImageProcessor, \
                         YolosImageProcessor)"
                    ),
                ));
            }
        }
        // YOLOS's processor: its own size forms (a bare size is the shortest edge, `max_size`
        // the longest, 1333 by default), always padding batches.
        let yolos = get("image_processor_type")
            .and_then(Value::as_str)
            .map(|t| t.starts_with("Yolos"))
            .unwrap_or(matches!(
                defaults.resize,
                Some(Resize::ShortestLongest { .. })
            ));
        if yolos {
            // `pad_and_return_pixel_mask` is the older name of `do_pad`.
            let pad = match get("do_pad") {
                Some(_) => flag("do_pad", true)?,
                None => flag("pad_and_return_pixel_mask", true)?,
            };
            if !pad || get("pad_size").is_some() {
                return Err(err(
                    "do_pad",
                    "YOLOS batches are padded to their largest image (do_pad true, no pad_size)"
                        .into(),
                ));
            }
            if let Some(f) = get("format").and_then(Value::as_str) {
                if f != "coco_detection" {
                    return Err(err("format", format!("{f:?}: only coco_detection")));
                }
            }
            // Boxes are always given to the model as normalised (cx, cy, w, h).
            if !flag("do_convert_annotations", flag("do_normalize", true)?)? {
                return Err(err(
                    "do_convert_annotations",
                    "false is not supported (boxes are always normalised centre and size)".into(),
                ));
            }
            let max_size = match get("max_size") {
                None => 1333,
                Some(x) => x
                    .as_u64()
                    .filter(|&n| (1..=MAX_SIDE as u64).contains(&n))
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        err(
                            "max_size",
                            format!("expected a size from 1 to {MAX_SIDE}, got {x}"),
                        )
                    })?,
            };
            if let Some(sz) = get("size") {
                out.resize = Some(match sz {
                    Value::Object(o) => match (
                        o.get("height"),
                        o.get("width"),
                        o.get("shortest_edge"),
                        o.get("longest_edge"),
                    ) {
                        (Some(h), Some(w), _, _) => Resize::Exact(size_of(h)?, size_of(w)?),
                        (_, _, Some(a), Some(b)) => Resize::ShortestLongest {
                            shortest: size_of(a)?,
                            longest: size_of(b)?,
                        },
                        _ => {
                            return Err(err(
                                "size",
                                format!(
                                    "{sz}: expected height and width, or shortest_edge and \
                                     longest_edge"
                                ),
                            ))
                        }
                    },
                    x => Resize::ShortestLongest {
                        shortest: size_of(x)?,
                        longest: max_size,
                    },
                });
            }
        }
        let crop_pct = match get("crop_pct") {
            None => None,
            Some(x) => Some(
                x.as_f64()
                    .filter(|c| *c > 0.0 && *c <= 1.0)
                    .ok_or_else(|| {
                        err("crop_pct", format!("expected a number in (0, 1], got {x}"))
                    })?,
            ),
        };
        // ConvNeXT's processor reads a bare size as the shortest edge (`default_to_square =
        // False`); ViT's as a square.
        let shortest_edge_kind = get("image_processor_type")
            .and_then(Value::as_str)
            .map(|t| t.starts_with("ConvNext"))
            .unwrap_or(matches!(
                defaults.resize,
                Some(Resize::ShortestEdgeCrop { .. })
            ));
        let default_crop = match defaults.resize {
            Some(Resize::ShortestEdgeCrop { crop_pct, .. }) => crop_pct,
            _ => 224.0 / 256.0,
        };
        if let (Some(s), false) = (get("size"), yolos) {
            out.resize = Some(match s {
                Value::Object(o) => match (o.get("height"), o.get("width"), o.get("shortest_edge"))
                {
                    (Some(h), Some(w), _) => Resize::Exact(size_of(h)?, size_of(w)?),
                    (_, _, Some(e)) => Resize::ShortestEdgeCrop {
                        edge: size_of(e)?,
                        crop_pct: crop_pct.unwrap_or(default_crop),
                    },
                    _ => {
                        return Err(err(
                            "size",
                            format!("{s}: expected height and width, or shortest_edge"),
                        ))
                    }
                },
                x if shortest_edge_kind => Resize::ShortestEdgeCrop {
                    edge: size_of(x)?,
                    crop_pct: crop_pct.unwrap_or(default_crop),
                },
                x => {
                    let n = size_of(x)?;
                    Resize::Exact(n, n)
                }
            });
        } else if let (Some(c), Some(Resize::ShortestEdgeCrop { edge, .. })) =
            (crop_pct, &out.resize)
        {
            out.resize = Some(Resize::ShortestEdgeCrop {
                edge: *edge,
                crop_pct: c,
            });
        }
        if !flag("do_resize", true)? {
            out.resize = None;
        }
        if flag("do_center_crop", false)? {
            return Err(err(
                "do_center_crop",
                "a separate center crop is not supported".into(),
            ));
        }
        if let Some(r) = get("resample") {
            out.filter = match r.as_u64() {
                Some(2) => Filter::Bilinear,
                Some(3) => Filter::Bicubic,
                _ => {
                    return Err(err(
                        "resample",
                        format!("{r}: supported are 2 (bilinear) and 3 (bicubic)"),
                    ))
                }
            };
        }
        let rescale = match get("rescale_factor") {
            None => defaults.rescale.unwrap_or(1.0 / 255.0),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| {
                    err(
                        "rescale_factor",
                        format!("expected a positive number, got {x}"),
                    )
                })? as f32,
        };
        out.rescale = flag("do_rescale", true)?.then_some(rescale);
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match get(k) {
                None => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut t = [0.0; 3];
                    for (i, x) in a.iter().enumerate() {
                        t[i] = x
                            .as_f64()
                            .filter(|f| f.is_finite())
                            .ok_or_else(|| err(k, format!("expected numbers, got {x}")))?
                            as f32;
                    }
                    Ok(t)
                }
                Some(x) => Err(err(
                    k,
                    format!("expected 3 numbers (one per channel), got {x}"),
                )),
            }
        };
        let (m0, s0) = defaults.normalize.unwrap_or(IMAGENET_STANDARD);
        let (mean, std) = (triple("image_mean", m0)?, triple("image_std", s0)?);
        if std.iter().any(|s| *s <= 0.0) {
            return Err(err("image_std", format!("{std:?}: must be positive")));
        }
        out.normalize = flag("do_normalize", true)?.then_some((mean, std));
        Ok(out)
    }

    /// Why this processor cannot take `img`, if it cannot: YOLOS's resize of an image whose
    /// side would floor to 0 (under 16 pixels, or an extreme aspect ratio), which transformers
    /// fails on too.
    pub fn refuses(&self, img: &Rgb8) -> Option<String> {
        match &self.resize {
            Some(Resize::ShortestLongest { shortest, longest })
                if yolos_size((img.height, img.width), *shortest, *longest).is_none() =>
            {
                Some(format!(
                    "a {}x{} image has a side under 16 pixels after YOLOS's resize (shortest edge \
                     {shortest}, longest {longest}, multiples of 16)",
                    img.width, img.height
                ))
            }
            _ => None,
        }
    }

    /// The resized (and cropped) 8-bit image.
    pub fn resized(&self, img: &Rgb8) -> Rgb8 {
        match &self.resize {
            None => img.clone(),
            Some(Resize::Exact(h, w)) => resize(img, *h, *w, self.filter),
            Some(Resize::ShortestLongest { shortest, longest }) => {
                // An image under 16 pixels a side: transformers fails; kept as it is here, and
                // the model refuses what is smaller than a patch.
                match yolos_size((img.height, img.width), *shortest, *longest) {
                    Some((h, w)) => resize(img, h, w, self.filter),
                    None => img.clone(),
                }
            }
            Some(Resize::ShortestEdgeCrop { edge, crop_pct }) => {
                let edge = *edge;
                if edge >= 384 {
                    return resize(img, edge, edge, self.filter);
                }
                let short_target = (edge as f64 / *crop_pct) as usize;
                let (h, w) = (img.height, img.width);
                let (rh, rw) = if w <= h {
                    (
                        (short_target as f64 * h as f64 / w as f64) as usize,
                        short_target,
                    )
                } else {
                    (
                        short_target,
                        (short_target as f64 * w as f64 / h as f64) as usize,
                    )
                };
                let r = resize(img, rh.max(1), rw.max(1), self.filter);
                center_crop(&r, edge, edge)
            }
        }
    }

    /// `(C, H, W)` f32 pixel values of `img`, and `(H, W)`.
    pub fn pixels(&self, img: &Rgb8) -> (Vec<f32>, usize, usize) {
        let r = self.resized(img);
        let (h, w) = (r.height, r.width);
        let mut out = vec![0.0f32; 3 * h * w];
        // transformers fuses the two: (x - mean / factor) / (std / factor).
        let (mean, std) = match (self.rescale, self.normalize) {
            (Some(f), Some((m, s))) => (m.map(|v| v * (1.0 / f)), s.map(|v| v * (1.0 / f))),
            (Some(f), None) => ([0.0; 3], [1.0 / f; 3]),
            (None, Some((m, s))) => (m, s),
            (None, None) => ([0.0; 3], [1.0; 3]),
        };
        for c in 0..3 {
            let plane = &mut out[c * h * w..(c + 1) * h * w];
            for (i, v) in plane.iter_mut().enumerate() {
                let x = r.data[i * 3 + c] as f32;
                *v = match (self.rescale, self.normalize) {
                    (Some(f), None) => x * f,
                    _ => (x - mean[c]) / std[c],
                };
            }
        }
        (out, h, w)
    }
}

/// torchvision's center crop as transformers calls it: zero padding when the crop is larger,
/// then the window at `int((H - h) / 2)`, `int((W - w) / 2)`.
pub fn center_crop(img: &Rgb8, h: usize, w: usize) -> Rgb8 {
    let (mut top, mut left) = (0isize, 0isize);
    let (mut ih, mut iw) = (img.height as isize, img.width as isize);
    if h as isize > ih {
        top -= (h as isize - ih) / 2;
        ih = h as isize;
    }
    if w as isize > iw {
        left -= (w as isize - iw) / 2;
        iw = w as isize;
    }
    top += (ih - h as isize) / 2;
    left += (iw - w as isize) / 2;
    img.crop(top, left, h, w)
}
