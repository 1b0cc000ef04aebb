"""Online alignment of a base image onto a frame (SPEC.md §4), with OpenCV.

Undistort both images with the trial's K, d; project the HaMeR keypoints with HaMeR's camera
(focal K[0,0]/256*max(w,h), principal point at the image centre, translation cam_t); fit the
homography taking the base's keypoints [0,1,5,17] onto the frame's (RANSAC, 3 px); warp the
base (cubic, black border); crop both around the frame's keypoints [0,1,2,5,9,13,17].
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dd_jax.data.egodorsal import ALIGN_KEYPOINTS, CROP_KEYPOINTS

HAMER_IMAGE_SIZE = 256  # HaMeR's internal crop resolution, which its focal convention refers to
CROP_MARGINS = (50, 101, 50, 51)  # left, right, top, bottom, as the released crop_by_points


class AlignmentError(ValueError):
  """The keypoints do not define a usable homography or crop."""


@dataclasses.dataclass(frozen=True)
class Alignment:
  homography: np.ndarray  # (3, 3) base pixels -> frame pixels (undistorted images)
  box: tuple[int, int, int, int]  # x0, x1, y0, y1 of the crop in the frame
  frame_keypoints: np.ndarray  # (21, 2) projected frame keypoints
  base_keypoints: np.ndarray  # (21, 2) projected base keypoints


def hamer_focal(K: np.ndarray, width: int, height: int) -> float:
  return float(K[0, 0]) / HAMER_IMAGE_SIZE * max(width, height)


def project_hamer(keypoints_3d: np.ndarray, cam_t: np.ndarray, focal: float, width: int,
                  height: int) -> np.ndarray:
  """(21, 3) camera-frame keypoints + cam_t -> (21, 2) pixels, principal point at the centre."""
  p = np.asarray(keypoints_3d, np.float64) + np.asarray(cam_t, np.float64).reshape(3)
  return focal * p[:, :2] / p[:, 2:3] + np.array([width / 2.0, height / 2.0])


def base_homography(base_keypoints: np.ndarray, frame_keypoints: np.ndarray,
                    align_keypoints=ALIGN_KEYPOINTS) -> np.ndarray:
  """Homography (3, 3) taking base keypoints onto frame keypoints (RANSAC, 3 px)."""
  src = np.asarray(base_keypoints, np.float64)[list(align_keypoints)]
  dst = np.asarray(frame_keypoints, np.float64)[list(align_keypoints)]
  if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
    raise AlignmentError("non-finite projected keypoints (a keypoint behind the camera?)")
  H, _ = cv2.findHomography(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
  if H is None or not np.all(np.isfinite(H)):
    raise AlignmentError("no homography from the base keypoints to the frame keypoints "
                         "(degenerate keypoints)")
  return H


def crop_box(points: np.ndarray, width: int, height: int,
             margins=CROP_MARGINS) -> tuple[int, int, int, int]:
  """Crop (x0, x1, y0, y1) around `points` (N, 2) with the released code's margins, clipped."""
  left, right, top, bottom = margins
  x0 = int(np.floor(points[:, 0].min())) - left
  x1 = int(np.ceil(points[:, 0].max())) + right
  y0 = int(np.floor(points[:, 1].min())) - top
  y1 = int(np.ceil(points[:, 1].max())) + bottom
  x0, x1 = (int(v) for v in np.clip([x0, x1], 0, width))
  y0, y1 = (int(v) for v in np.clip([y0, y1], 0, height))
  if x1 <= x0 or y1 <= y0:
    raise AlignmentError(f"the crop around the frame keypoints is empty (box x {x0}..{x1}, "
                         f"y {y0}..{y1} in a {width}x{height} image)")
  return x0, x1, y0, y1


def place_prior_keypoints(keypoints_2d: np.ndarray | None, width: int, height: int
                          ) -> tuple[np.ndarray | None, str]:
  """The prior's (21, 2) keypoints in THIS image's pixels, and how they were placed.

  HaMeR files hold keypoints in pixels of the full (undistorted) frame. They are used when
  - the image is a precrop made by the EgoDorsal crop rule (align.crop_box: keypoints
    [0,1,2,5,9,13,17], margins left 50 / right 101 / top 50 / bottom 51, clipped to the frame)
    from that frame: the crop origin follows from the keypoints and the image size must fit
    the box (only the right / bottom edge may have been clipped); the keypoints are shifted
    (this is also how an online crop is made: crop_box on the same keypoints);
  - or all 21 keypoints lie inside the image: taken as the full frame, unshifted.
  Otherwise (normalised coordinates, another crop rule, no keypoints) None is returned.
  """
  if keypoints_2d is None:
    return None, "no keypoints_2d in the prior"
  points = np.asarray(keypoints_2d, np.float64).reshape(21, 2)
  if not np.all(np.isfinite(points)) or np.ptp(points, axis=0).max() < 8:
    return None, "prior keypoints_2d are not pixel coordinates"
  crop = points[list(CROP_KEYPOINTS)]
  left, right, top, bottom = CROP_MARGINS
  x0 = max(int(np.floor(crop[:, 0].min())) - left, 0)
  y0 = max(int(np.floor(crop[:, 1].min())) - top, 0)
  x1 = int(np.ceil(crop[:, 0].max())) + right
  y1 = int(np.ceil(crop[:, 1].max())) + bottom
  shifted = points - (x0, y0)
  wrist_inside = 0 <= shifted[0, 0] < width and 0 <= shifted[0, 1] < height
  if width <= x1 - x0 + 1 and height <= y1 - y0 + 1 and wrist_inside:
    return shifted, f"prior keypoints_2d, precrop at ({x0}, {y0}) of the frame"
  inside = np.all((points >= -0.5) & (points <= np.array([width, height]) - 0.5))
  if inside:
    return points, "prior keypoints_2d, full frame"
  return None, "prior keypoints_2d do not fall on this image"


class Undistorter:
  """cv2.undistort with the remap tables cached per (K, d, size): same output, less work."""

  def __init__(self, max_entries: int = 16):
    self._maps: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    self._max_entries = max_entries

  def __call__(self, image: np.ndarray, K: np.ndarray, d: np.ndarray) -> np.ndarray:
    if not np.any(d):
      return image
    h, w = image.shape[:2]
    key = (K.tobytes(), d.tobytes(), w, h)
    maps = self._maps.get(key)
    if maps is None:
      if len(self._maps) >= self._max_entries:
        self._maps.pop(next(iter(self._maps)))
      maps = cv2.initUndistortRectifyMap(K, d, None, K, (w, h), cv2.CV_16SC2)
      self._maps[key] = maps
    return cv2.remap(image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

  def __getstate__(self):
    return {"_maps": {}, "_max_entries": self._max_entries}


def compute_alignment(K: np.ndarray, width: int, height: int, frame_kp3d: np.ndarray,
                      frame_cam_t: np.ndarray, base_kp3d: np.ndarray, base_cam_t: np.ndarray
                      ) -> Alignment:
  """Homography and crop box for undistorted images of size width x height."""
  focal = hamer_focal(K, width, height)
  frame_kp = project_hamer(frame_kp3d, frame_cam_t, focal, width, height)
  base_kp = project_hamer(base_kp3d, base_cam_t, focal, width, height)
  H = base_homography(base_kp, frame_kp)
  box = crop_box(frame_kp[list(CROP_KEYPOINTS)], width, height)
  return Alignment(H, box, frame_kp, base_kp)


def online_crops(K: np.ndarray, frame_image: np.ndarray, base_image: np.ndarray,
                 frame_kp3d: np.ndarray, frame_cam_t: np.ndarray, base_kp3d: np.ndarray,
                 base_cam_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, Alignment]:
  """The online mode on undistorted full images and both priors' keypoints_3d / cam_t:
  (frame crop, aligned base crop, alignment). The data pipeline and the end-to-end predictor
  (dd_jax.full_frames) both crop through here."""
  height, width = frame_image.shape[:2]
  alignment = compute_alignment(K, width, height, frame_kp3d, frame_cam_t, base_kp3d, base_cam_t)
  return (*align_and_crop(frame_image, base_image, alignment), alignment)


def align_and_crop(frame_image: np.ndarray, base_image: np.ndarray, alignment: Alignment
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(frame crop, aligned base crop) from undistorted full images."""
  x0, x1, y0, y1 = alignment.box
  H = alignment.homography
  # Warping only the crop window: translate the homography's output by the crop origin.
  shift = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
  base_crop = cv2.warpPerspective(base_image, shift @ H, (x1 - x0, y1 - y0),
                                  flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0)
  return frame_image[y0:y1, x0:x1], base_crop
