// Resolve and load hooks of node_interop.mjs.
const DICOM_PARSER_ESM = new URL('./dicom_parser_esm.mjs', import.meta.url).href;
const DECODERS = '/@cornerstonejs/dicom-image-loader/dist/esm/shared/decoders/';
const PACKAGE_ASSET_URL = /new URL\('(@[^']+)', import\.meta\.url\)/g;

export async function resolve(specifier, context, nextResolve) {
  if (specifier === 'dicom-parser' && context.parentURL !== DICOM_PARSER_ESM) {
    return { url: DICOM_PARSER_ESM, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}

export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  if (!url.includes(DECODERS) || loaded.format !== 'module') {
    return loaded;
  }
  const source = String(loaded.source).replace(PACKAGE_ASSET_URL, "new URL(import.meta.resolve('$1'))");
  return { ...loaded, source };
}
