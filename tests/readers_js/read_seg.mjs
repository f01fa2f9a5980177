// Read DICOM-SEG files the way OHIF 3.13.2 does, under Node, and write what it makes of them.
//
//   node --import ./node_interop.mjs read_seg.mjs JOB.json
//
// JOB.json: {"sources": [CT files of the referenced series, in display order], "segs": [{"id", "path"}], "out": DIR}
//
// For every SEG two readers run, both ending in the Cornerstone3D adapters' labelmap builder
// (createLabelmapsFromSegImageIds: frame -> source image by Derivation Image Sequence, orientation check, flips,
// placement):
//   "ohif":   adaptersSEG.Cornerstone3D.Segmentation.createFromDicomSegImageId with OHIF 3.13.2's arguments
//             (extensions/cornerstone-dicom-seg: tolerance 0.001, parserType "labelmap" for Label Map Segmentation
//             Storage and "bitmap" for Segmentation Storage, one image id per frame); each frame is decoded the way
//             @cornerstonejs/dicom-image-loader's wadouri loader does in the browser (getPixelData, then the decode
//             worker's decodeImageFrame with its codecs: OpenJPEG, CharLS, RLE), called in-process instead of in a
//             web worker and without createImage's canvas.
//   "buffer": adaptersSEG.Cornerstone3D.Segmentation.createLabelmapsFromDICOMBuffer (dcmjs parses the file; the
//             adapters' own frame decoding: native and RLE only).
// Metadata: the source files are parsed by dicom-image-loader's wadouri data-set cache (its metadata provider answers
// imagePlaneModule, imagePixelModule, generalSeriesModule, generalImageModule ...), and "instance" is the
// dcmjs-naturalized dataset, as OHIF's metadata provider returns it.
//
// Per SEG and reader it writes DIR/<id>.<reader>.json: the versions, "ok" or the "error" the reader threw, the
// source SOP Instance UIDs in order, per frame [source index it is placed on, segment number], the segment
// metadata OHIF builds its segment list and colour table from ([index, SegmentNumber, SegmentLabel, has colour]),
// the reader's console warnings; and, when it read, DIR/<id>.<reader>.raw: the labelmap images in source order
// (uint8, sources x rows x columns; a pixel holds the segment number shown there).

import { readFileSync, writeFileSync } from 'node:fs';

import * as core from '@cornerstonejs/core';
import { adaptersSEG } from '@cornerstonejs/adapters';
import { findReferenceSourceImageId, getSegmentIndex } from '@cornerstonejs/adapters/cornerstone/Segmentation_4X';
import { decodeImageFrame, getImageFrame, wadouri } from '@cornerstonejs/dicom-image-loader';
import imageLoaderParts from '@cornerstonejs/dicom-image-loader/imageLoader';
import dcmjs from 'dcmjs';

const { getScalingParameters, setPixelDataType } = imageLoaderParts;
const VERSIONS = Object.fromEntries(
  [
    '@cornerstonejs/adapters', '@cornerstonejs/core', '@cornerstonejs/dicom-image-loader', 'dcmjs',
    '@cornerstonejs/codec-openjpeg', '@cornerstonejs/codec-charls',
  ].map((name) => [
    name,
    JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8')).version,
  ]),
);
const LABELMAP_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.66.7';
const TOLERANCE = 0.001; // OHIF 3.13.2's tolerance for createFromDicomSegImageId

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const { Normalizer } = dcmjs.normalizers;
const Segmentation = adaptersSEG.Cornerstone3D.Segmentation;

function fileArrayBuffer(path) {
  const bytes = readFileSync(path);
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
}

function naturalized(path) {
  const message = DicomMessage.readFile(fileArrayBuffer(path));
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
  return dataset;
}

const imageId = (path) => `wadouri:${path}`;
const loadFromDisk = async (url) => fileArrayBuffer(url);
const instances = new Map();

core.metaData.addProvider((type, id) => (type === 'instance' ? instances.get(id) : undefined), 10000);
core.metaData.addProvider(wadouri.metaData.metaDataProvider, 1000);

async function register(path) {
  const id = imageId(path);
  await wadouri.dataSetCacheManager.load(path, loadFromDisk, id);
  instances.set(id, naturalized(path));
  return id;
}

// What dicom-image-loader's wadouri loadImage + createImage do to one frame, minus the worker hop and the canvas.
async function decodeLikeImageLoader(frameImageId) {
  const { url, pixelDataFrame } = wadouri.parseImageId(frameImageId);
  const dataSet = await wadouri.dataSetCacheManager.load(url, loadFromDisk, frameImageId);
  const pixelData = wadouri.getPixelData(dataSet, pixelDataFrame ?? 0);
  const transferSyntax = dataSet.string('x00020010');
  const imageFrame = getImageFrame(frameImageId);
  const scalingParameters = getScalingParameters(core.metaData, frameImageId);
  const options = { preScale: scalingParameters ? { enabled: true, scalingParameters } : { enabled: false } };
  const decoded = await decodeImageFrame(imageFrame, transferSyntax, pixelData, {}, options);
  setPixelDataType(decoded);
  return decoded.pixelData;
}

// Frame -> [index of the source image it is placed on (null: none), segment number], by the adapters' own functions.
function frameMapping(multiframe, referencedImageIds) {
  const sopToImageId = {};
  for (const id of referencedImageIds) {
    sopToImageId[instances.get(id).SOPInstanceUID] = id;
  }
  const frames = [multiframe.PerFrameFunctionalGroupsSequence].flat();
  return frames.map((_, index) => {
    const found = findReferenceSourceImageId(multiframe, index, referencedImageIds, core.metaData, TOLERANCE,
      sopToImageId);
    return [found === undefined ? null : referencedImageIds.indexOf(found), getSegmentIndex(multiframe, index) ?? null];
  });
}

async function readSeg(seg, referencedImageIds, reader) {
  const segImageId = imageId(seg.path);
  const dataset = naturalized(seg.path);
  const numberOfFrames = Number(dataset.NumberOfFrames) || 1;
  const report = {
    reader,
    versions: VERSIONS,
    sopClassUID: dataset.SOPClassUID,
    transferSyntaxUID: dataset._meta.TransferSyntaxUID.Value[0],
    numberOfFrames,
    sources: referencedImageIds.map((id) => instances.get(id).SOPInstanceUID),
  };
  const warnings = [];
  const warn = console.warn;
  console.warn = (...args) => warnings.push(args.map(String).join(' '));
  try {
    let result;
    if (reader === 'ohif') {
      await wadouri.dataSetCacheManager.load(seg.path, loadFromDisk, segImageId);
      instances.set(segImageId, dataset);
      const frameImageIds = Array.from({ length: numberOfFrames }, (_, i) => `${segImageId}&frame=${i + 1}`);
      const parserType = dataset.SOPClassUID === LABELMAP_SOP_CLASS ? 'labelmap' : 'bitmap';
      result = await Segmentation.createFromDicomSegImageId(referencedImageIds, segImageId, {
        metadataProvider: core.metaData,
        tolerance: TOLERANCE,
        parserType,
        frameImageIds,
        concurrency: 16,
        decodeImageData: decodeLikeImageLoader,
      });
    } else {
      result = await Segmentation.createLabelmapsFromDICOMBuffer(referencedImageIds, fileArrayBuffer(seg.path),
        core.metaData, { tolerance: TOLERANCE });
    }
    const images = result.labelMapImages[0];
    const { rows, columns } = core.metaData.get('imagePlaneModule', referencedImageIds[0]);
    const voxels = new Uint8Array(images.length * rows * columns);
    images.forEach((image, index) => voxels.set(image.getPixelData(), index * rows * columns));
    writeFileSync(`${seg.out}.raw`, voxels);
    const multiframe = Normalizer.normalizeToDataset([naturalized(seg.path)]);
    Object.assign(report, {
      ok: true,
      shape: [images.length, rows, columns],
      labelmapSets: result.labelMapImages.length,
      overlappingSegments: Boolean(result.overlappingSegments),
      frameToSource: frameMapping(multiframe, referencedImageIds),
      labelmapReferences: images.map((image) => referencedImageIds.indexOf(image.referencedImageId)),
      // OHIF builds the segment list and colour table from this array: index = labelmap value.
      segmentMetadata: result.segMetadata.data.flatMap((segment, index) => (segment
        ? [[index, Number(segment.SegmentNumber), segment.SegmentLabel ?? null,
          Array.isArray(segment.RecommendedDisplayCIELabValue)]]
        : [])),
    });
  } catch (error) {
    Object.assign(report, { ok: false, error: String(error?.message ?? error).split('\n')[0] });
  } finally {
    console.warn = warn;
  }
  report.warnings = [...new Set(warnings)].slice(0, 20);
  writeFileSync(`${seg.out}.json`, JSON.stringify(report));
}

const job = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const referencedImageIds = [];
for (const path of job.sources) {
  referencedImageIds.push(await register(path));
}
for (const seg of job.segs) {
  for (const reader of ['ohif', 'buffer']) {
    await readSeg({ ...seg, out: `${job.out}/${seg.id}.${reader}` }, referencedImageIds, reader);
    core.cache.purgeCache();
  }
}
