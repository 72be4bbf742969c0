"""Make a demo reference portrait and driving clip without downloading anything.

    python examples/make_demo_inputs.py [--out examples/demo] [--num_frames 49] [--fps 25]
"""

import argparse

from flashportrait.demo import write_demo_inputs


def main(args):
    reference, driving = write_demo_inputs(args.out, num_frames=args.num_frames, fps=args.fps)
    print(f"reference image: {reference}\ndriving video:   {driving}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/demo", help="output folder")
    parser.add_argument("--num_frames", type=int, default=49, help="driving frames (4k+1 avoids dropping any)")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the driving clip")
    main(parser.parse_args())
