//! mAP against pycocotools' COCOeval (fixture written by `fixtures/parity/make_coco_map.py`):
//! AP@[.5:.95], AP50 and AP75 on five random cases with crowd boxes, equal scores, classes and
//! images without ground truth, and more than 100 detections per image.

use lora_train::vision::map::{coco_map, Detection, GroundTruth};

#[test]
fn matches_pycocotools() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/parity/coco_map/cases.json"
    );
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let bbox = |v: &serde_json::Value| -> [f64; 4] {
        let a = v.as_array().unwrap();
        [0, 1, 2, 3].map(|i| a[i].as_f64().unwrap())
    };
    let mut n = 0;
    for c in cases.as_array().unwrap() {
        // COCO ids are 1-based.
        let idx = |v: &serde_json::Value| v.as_u64().unwrap() as usize - 1;
        let gts: Vec<GroundTruth> = c["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| GroundTruth {
                image: idx(&a["image_id"]),
                class: idx(&a["category_id"]),
                bbox: bbox(&a["bbox"]),
                crowd: a["iscrowd"].as_u64().unwrap() == 1,
            })
            .collect();
        let dets: Vec<Detection> = c["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| Detection {
                image: idx(&d["image_id"]),
                class: idx(&d["category_id"]),
                bbox: bbox(&d["bbox"]),
                score: d["score"].as_f64().unwrap(),
            })
            .collect();
        let classes = c["categories"].as_array().unwrap().len();
        let r = coco_map(&gts, &dets, classes);
        for (what, got, want) in [
            ("map", r.map, &c["map"]),
            ("map50", r.map50, &c["map50"]),
            ("map75", r.map75, &c["map75"]),
        ] {
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-12,
                "case {n} {what}: {got} vs pycocotools {want}"
            );
        }
        // Each class's AP is that class evaluated alone, and the headline means are their mean
        // (every class with ground truth weighs the same, as in pycocotools).
        let present: Vec<[f64; 2]> = r.per_class.iter().flatten().copied().collect();
        assert!(!present.is_empty());
        let mean = |k: usize| present.iter().map(|a| a[k]).sum::<f64>() / present.len() as f64;
        assert!((mean(0) - r.map).abs() < 1e-12 && (mean(1) - r.map50).abs() < 1e-12);
        for (class, ap) in r.per_class.iter().enumerate() {
            let g: Vec<GroundTruth> = gts
                .iter()
                .filter(|g| g.class == class)
                .map(|g| GroundTruth { class: 0, ..*g })
                .collect();
            let d: Vec<Detection> = dets
                .iter()
                .filter(|d| d.class == class)
                .map(|d| Detection { class: 0, ..*d })
                .collect();
            let alone = coco_map(&g, &d, 1);
            match ap {
                Some(ap) => assert!(
                    (ap[0] - alone.map).abs() < 1e-12 && ap[1] == alone.map50,
                    "case {n} class {class}: {ap:?} vs {} {}",
                    alone.map,
                    alone.map50
                ),
                None => assert!(g.iter().all(|g| g.crowd), "case {n} class {class}"),
            }
        }
        n += 1;
    }
    assert_eq!(n, 5);
}

#[test]
fn perfect_and_empty_detections() {
    let g = |image, class, x| GroundTruth {
        image,
        class,
        bbox: [x, 10.0, 20.0, 20.0],
        crowd: false,
    };
    let gts = vec![g(0, 0, 0.0), g(0, 1, 50.0), g(1, 0, 30.0)];
    let dets: Vec<Detection> = gts
        .iter()
        .map(|g| Detection {
            image: g.image,
            class: g.class,
            bbox: g.bbox,
            score: 0.9,
        })
        .collect();
    let r = coco_map(&gts, &dets, 2);
    assert_eq!((r.map, r.map50, r.map75), (1.0, 1.0, 1.0));
    let r = coco_map(&gts, &[], 2);
    assert_eq!(r.map, 0.0);
    // No ground truth at all: undefined, -1 as pycocotools reports it.
    assert_eq!(coco_map(&[], &dets, 2).map, -1.0);
}
