#!/usr/bin/env bash
# Makes demo.mp4, the clip the built-in demo source loops as a live stream.
#
# 16 s so that both tracks end exactly on a frame boundary: 480 video frames at
# 30 fps (timescale 15360, 512 ticks each) and 750 AAC frames of 1024 samples at
# 48 kHz. The demo source shifts each track by its own clip duration per loop,
# so the two must be equal to the sample, or audio would drift from video.
#
# Two steps, because of AAC priming: encoding AAC straight into MP4 gives its
# 1024 priming samples a negative timestamp, and the fragmented muxer, which
# cannot write an edit list after the fact, stretches the first video frame by
# 21 ms to compensate; the clip would then be 16.021 s of video and 16.000 s of
# audio. Going through ADTS drops that timing: the 750 frames (priming frame
# included, hence 766976 input samples) start at 0 and last exactly 16 s. The
# cost is 21 ms of near-silence at the start of each loop.
#
# Video: a test pattern with a large running clock (testsrc2 adds a small timer
# and frame counter), H.264 baseline (no B-frames), a keyframe every second and
# one 1-s fragment per keyframe, so every fragment can start playback.
# Audio: a 440 Hz sine that beeps once a second, so A/V sync is audible.
set -euo pipefail
cd "$(dirname "$0")"
font=/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ffmpeg -hide_banner -loglevel warning -y \
  -f lavfi -i "sine=frequency=440:beep_factor=4:sample_rate=48000,atrim=end_sample=766976" \
  -c:a aac -b:a 64k -ac 1 -flags:a +bitexact \
  -f adts "$tmp/audio.aac"

ffmpeg -hide_banner -loglevel warning -y \
  -f lavfi -i "testsrc2=size=640x360:rate=30:duration=16,drawtext=fontfile=$font:text='clubcast demo  %{pts\:hms}':x=(w-tw)/2:y=h-th-24:fontsize=36:fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=10" \
  -i "$tmp/audio.aac" \
  -map 0:v -map 1:a \
  -c:v libx264 -profile:v baseline -preset veryfast -pix_fmt yuv420p \
  -b:v 700k -maxrate 900k -bufsize 900k -g 30 -keyint_min 30 -sc_threshold 0 -bf 0 \
  -c:a copy -bsf:a aac_adtstoasc \
  -movflags frag_keyframe+empty_moov+default_base_moof -frag_duration 1000000 \
  -fflags +bitexact -flags:v +bitexact \
  -f mp4 demo.mp4
