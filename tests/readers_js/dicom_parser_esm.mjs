// dicom-parser's UMD members as named ESM exports (see node_interop.mjs).
import dicomParser from 'dicom-parser';

export const {
  ByteStream, DataSet, createJPEGBasicOffsetTable, parseDA, parseDicom, parsePN, parseTM, readEncapsulatedImageFrame,
  readEncapsulatedPixelData, readEncapsulatedPixelDataFromFragments, readSequenceItem,
} = dicomParser;
export default dicomParser;
